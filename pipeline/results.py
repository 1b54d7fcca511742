"""What a stage writes for `dvc exp show` / `dvc metrics diff`, and what it writes for people.

`metrics/<stage>.json` (declared as DVC metrics) holds only the numbers worth comparing across
experiments: accuracies, sizes, MACs, epochs, latencies; never strings, flags, wall-clock
seconds or machine details, so `dvc exp show` stays readable and `dvc metrics diff` after a
params change shows that change, not timing noise. `reports/<stage>.json` (a plain output,
not a metric) holds the stage's whole record: the same numbers and everything else (strings,
flags, lists, seconds, device). MLflow gets every number of the record.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pipeline import paths
from pipeline.files import write_json

# `dvc exp show` (paged) shows Experiment, Created, then every metrics file's keys in stage
# order, then params and deps: the stages' METRIC_KEYS together stay within a 200-column
# terminal's first screen (see tests/e2e/test_dvc_conventions.py)
MetricKeys = Sequence[str] | Mapping[str, str]  # names, or metric name -> key in the record


def comparable(record: dict, metric_keys: MetricKeys) -> dict:
    """The metrics file of `record`: its `metric_keys`, in that order (a mapping renames:
    metric name -> record key); a key whose value is None (not measured in this run) is left
    out. KeyError when the record lacks a key (a renamed key must not vanish silently),
    TypeError when a value is not a number: metrics files never hold strings or booleans."""
    pairs = (
        metric_keys.items() if isinstance(metric_keys, Mapping) else ((k, k) for k in metric_keys)
    )
    metrics = {}
    for name, key in pairs:
        value = record[key]
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"metric {key!r} is {value!r}: metrics files hold numbers only")
        metrics[name] = value
    return metrics


def write_results(stage: str, record: dict, metric_keys: MetricKeys) -> dict:
    """Write `reports/<stage>.json` (all of `record`) and `metrics/<stage>.json` (its
    `metric_keys`); return the metrics."""
    metrics = comparable(record, metric_keys)
    write_json(paths.report_file(stage), record)
    write_json(paths.metrics_file(stage), metrics)
    return metrics
