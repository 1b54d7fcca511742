"""One rank of a data-parallel training job: what `pipeline.train.train_recipe` runs under
torchrun when `train.nproc` > 1 outside the train stage (the search's final retrain).

    python -m pipeline.train_job JOB_DIR STAGE DESCRIPTION      (internal: torchrun runs it)

`JOB_DIR/recipe.json` holds the resolved params to train; every rank trains its shard with the
engine (`pipeline.train.train_and_evaluate`), and rank 0 writes `JOB_DIR/model.pt`: the model
as a checkpoint whose `metrics` are the record plus the engine's `fit` result (status, history,
seconds), for `train_recipe` to read back. Nothing else is written, and no MLflow run is made:
the stage that launched the job logs it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from pipeline import distributed
from pipeline.checkpoint import save_checkpoint
from pipeline.config import parse_params
from pipeline.errors import cli_entry
from pipeline.train import load_device_data, train_and_evaluate


@cli_entry
def main(argv: list[str] | None = None) -> None:
    job, stage, description = sys.argv[1:] if argv is None else argv
    job = Path(job)
    params = parse_params(json.loads((job / "recipe.json").read_text()))
    data = load_device_data(params, distributed.local_rank())
    with distributed.process_group(data.device, params.train.ddp_timeout_s, stage):
        outcome = train_and_evaluate(params, data, params.train, description=description)
    if distributed.is_main():
        record = {**outcome.metrics, "fit": dataclasses.asdict(outcome.fit)}
        save_checkpoint(job / "model.pt", outcome.model, outcome.arch, params, data.info, record)


if __name__ == "__main__":
    main()
