"""prepare stage: read the dataset named by `data.*`, split it, write `data/prepared/`.

Reads: params.yaml (`seed`, `data`, `tracking`). Writes: `data/prepared/{train,val,test}.pt`
and `data/prepared/dataset.json`; one MLflow run like every stage's (the flattened params, the
sha256 of the data and of each split as tags, the split sizes and class count as metrics,
dataset.json). Run: `dvc repro prepare`, `pipeline prepare` or `python -m pipeline.prepare`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from pipeline import paths
from pipeline.config import Params, load_params
from pipeline.data import Prepared, prepare, save_prepared
from pipeline.errors import stage_entry
from pipeline.tracking import check_tracking, stage_run

# no metrics/prepare.json: the split sizes are fixed by `data.*` and the dataset, so they are
# nothing to compare across experiments; they go to MLflow and dataset.json
METRIC_KEYS: tuple[str, ...] = ()


@dataclass
class PrepareOutcome:
    prepared: Prepared  # the splits (uint8 tensors + labels) and dataset.json's info
    metrics: dict  # images per split, classes: what MLflow gets


def run(params: Params) -> PrepareOutcome:
    """Load and split the dataset named by `data.*`; no file output."""
    prepared = prepare(params.data, params.seed)
    return PrepareOutcome(prepared, dataset_metrics(prepared.info))


def dataset_metrics(info: dict) -> dict:
    """The prepared data in numbers (dataset.json's): images per split, classes."""
    counts = {f"{split}_images": n for split, n in info["counts"].items()}
    return {**counts, "classes": len(info["classes"])}


def _split_hashes(info: dict) -> dict:
    return {f"sha256.{split}": sha for split, sha in info["sha256"].items() if split != "all"}


@stage_entry
def main(argv: list[str] | None = None) -> None:
    params = load_params(paths.PARAMS)
    check_tracking(params)  # before any work: the run starts once the data is written
    outcome = run(params)
    save_prepared(outcome.prepared, paths.PREPARED_DIR)
    info = outcome.prepared.info
    with stage_run("prepare", params, info["sha256"]["all"]) as tracker:
        tracker.log_params(params.to_dict())
        tracker.log_metrics(outcome.metrics)
        tracker.set_tags({"dataset": info["name"], **_split_hashes(info)})
        tracker.log_artifact(paths.DATASET_JSON, "data")
    print(
        f"prepared {info['name']}: {len(info['classes'])} classes, shape {info['shape']}, "
        f"train/val/test = {info['counts']['train']}/{info['counts']['val']}/"
        f"{info['counts']['test']} -> {paths.PREPARED_DIR}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
