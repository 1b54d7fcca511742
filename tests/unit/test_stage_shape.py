"""Every stage has one shape: `run(params, <inputs, loaded from the project when not given>)
-> <Stage>Outcome` whose `.metrics` is the stage's whole record, `METRIC_KEYS` naming the numbers
of that record that go to `metrics/<stage>.json`, and a thin `main(argv=None)`."""

import dataclasses
import inspect
import typing
from collections.abc import Mapping

import pytest

from pipeline import compress, export, paths, prepare, search, train
from pipeline.config import Params, parse_params
from pipeline.data import load_prepared, save_prepared
from pipeline.results import comparable
from pipeline.variants import VARIANTS
from tests.conftest import TINY_PARAMS

STAGES = {"prepare": prepare, "train": train, "search": search, "compress": compress}
STAGES["export"] = export


def _outcome_type(stage):
    return typing.get_type_hints(stage.run)["return"]


@pytest.mark.parametrize("stage", STAGES.values(), ids=list(STAGES))
def test_run_takes_params_first_and_defaults_every_other_input(stage):
    parameters = list(inspect.signature(stage.run).parameters.values())
    assert parameters[0].name == "params"
    assert typing.get_type_hints(stage.run)["params"] is Params
    # run(params) alone works in a project: every other input has a default
    assert [p.name for p in parameters[1:] if p.default is inspect.Parameter.empty] == []


@pytest.mark.parametrize(("name", "stage"), STAGES.items(), ids=list(STAGES))
def test_run_returns_a_stage_outcome_with_its_metrics_record(name, stage):
    outcome = _outcome_type(stage)
    assert dataclasses.is_dataclass(outcome)
    assert outcome.__name__ == f"{name.capitalize()}Outcome"
    assert "metrics" in {f.name for f in dataclasses.fields(outcome)}
    assert typing.get_type_hints(outcome)["metrics"] is dict


@pytest.mark.parametrize("stage", STAGES.values(), ids=list(STAGES))
def test_every_stage_names_its_metric_keys(stage):
    keys = stage.METRIC_KEYS
    assert isinstance(keys, (tuple, Mapping))
    assert all(isinstance(k, str) and k for k in keys)
    if isinstance(keys, Mapping):
        assert all(isinstance(v, str) and v for v in keys.values())


@pytest.mark.parametrize("stage", STAGES.values(), ids=list(STAGES))
def test_main_is_a_stage_entry_taking_only_argv(stage):
    inner = stage.main.__wrapped__  # `stage_entry`: --help and one-line errors (test_cli_help)
    parameters = inspect.signature(inner).parameters
    assert list(parameters) == ["argv"] and parameters["argv"].default is None


def test_prepare_run_returns_the_split_sizes_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    outcome = prepare.run(parse_params({}))  # digits
    assert isinstance(outcome, prepare.PrepareOutcome)
    sizes = {split: len(labels) for split, (_, labels) in outcome.prepared.splits.items()}
    assert outcome.metrics == {
        "train_images": sizes["train"],
        "val_images": sizes["val"],
        "test_images": sizes["test"],
        "classes": 10,
    }
    assert sum(sizes.values()) == 1797
    assert comparable(outcome.metrics, prepare.METRIC_KEYS) == {}  # no metrics/prepare.json
    assert list(tmp_path.iterdir()) == []


def _numbers(stage, outcome) -> dict:
    assert isinstance(outcome, _outcome_type(stage))
    metrics = comparable(outcome.metrics, stage.METRIC_KEYS)  # KeyError / TypeError otherwise
    assert list(metrics) == list(stage.METRIC_KEYS)  # none missing (None: not measured)
    return metrics


@pytest.mark.integration
def test_each_run_with_params_alone_reads_the_project_and_returns_its_metrics(
    tmp_path, monkeypatch
):
    """The five runs chained in a project folder, each given only `params` (its inputs are
    what the stage before wrote there); every outcome's record holds its METRIC_KEYS."""
    monkeypatch.chdir(tmp_path)
    raw = {**TINY_PARAMS, "tracking": {"enabled": False}}
    raw["search"] = {"n_trials": 2, "epochs": 2, "storage": f"sqlite:///{tmp_path / 's.db'}"}
    params = parse_params(raw)
    save_prepared(prepare.run(params).prepared, paths.PREPARED_DIR)
    info = load_prepared(paths.PREPARED_DIR).info

    trained = train.run(params)
    assert 0.5 < _numbers(train, trained)["val_accuracy"] <= 1
    train.write_outputs(trained, params, info)
    searched = search.run(params, progress=False)  # compared with the baseline just written
    assert searched.metrics["baseline_val_accuracy"] == trained.metrics["val_accuracy"]
    assert 0.5 < _numbers(search, searched)["tuned_val_accuracy"] <= 1
    search.write_outputs(searched, info)
    compressed = compress.run(params)  # reads models/tuned.pt, writes models/compressed/
    assert _numbers(compress, compressed)["macs_after"] == compressed.metrics["macs_after"] > 0
    assert {v.path for v in compressed.variants} == {s.source for s in VARIANTS}
    compress.write_outputs(compressed, info)
    exported = export.run(params)  # reads models/ and reports/compress.json
    metrics = _numbers(export, exported)
    assert metrics["test_accuracy"] == exported.recommended.entry["test_accuracy"]
