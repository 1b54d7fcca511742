"""prepare stage: read the dataset named by `data.*`, split it, write `data/prepared/`.

Reads: params.yaml (`seed`, `data`, `tracking`). Writes: `data/prepared/{train,val,test}.pt`
and `data/prepared/dataset.json`; one MLflow run like every stage's (the flattened params, the
sha256 of the data and of each split as tags, the split sizes and class count as metrics,
dataset.json). Run: `dvc repro prepare`, `pipeline prepare` or `python -m pipeline.prepare`.
"""

from __future__ import annotations

import sys

from pipeline import paths
from pipeline.config import load_params
from pipeline.data import Prepared, prepare, save_prepared
from pipeline.errors import stage_entry
from pipeline.tracking import check_tracking, stage_run


def run(params) -> Prepared:
    """Load and split the dataset; no file output."""
    return prepare(params.data, params.seed)


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
    prepared = run(params)
    save_prepared(prepared, paths.PREPARED_DIR)
    info = prepared.info
    with stage_run("prepare", params, info["sha256"]["all"]) as tracker:
        tracker.log_params(params.to_dict())
        tracker.log_metrics(dataset_metrics(info))
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
