"""prepare stage: read the dataset named by `data.*`, split it, write `data/prepared/`.

Reads: params.yaml (`seed`, `data`). Writes: `data/prepared/{train,val,test}.pt` and
`data/prepared/dataset.json`. Run: `dvc repro prepare`, `pipeline prepare` or
`python -m pipeline.prepare`.
"""

from __future__ import annotations

import sys

from pipeline import paths
from pipeline.config import load_params
from pipeline.data import Prepared, prepare, save_prepared
from pipeline.errors import stage_entry


def run(params) -> Prepared:
    """Load and split the dataset; no file output."""
    return prepare(params.data, params.seed)


@stage_entry
def main(argv: list[str] | None = None) -> None:
    params = load_params(paths.PARAMS)
    prepared = run(params)
    save_prepared(prepared, paths.PREPARED_DIR)
    info = prepared.info
    print(
        f"prepared {info['name']}: {len(info['classes'])} classes, shape {info['shape']}, "
        f"train/val/test = {info['counts']['train']}/{info['counts']['val']}/"
        f"{info['counts']['test']} -> {paths.PREPARED_DIR}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
