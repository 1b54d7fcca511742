"""train stage: train the baseline model with `train.*` on the prepared data.

Reads: params.yaml (`seed`, `device`, `model`, `train`, `tracking`), `data/prepared/`.
Writes: `models/baseline.pt` (checkpoint with arch, config and classes), `metrics/train.json`
(val accuracy), `reports/train.json` (also test accuracy, epochs, seconds, device),
`plots/train_curve.csv`, `plots/train_curve.png`; one MLflow run with params, per-epoch metrics
and the plot. Run: `dvc repro train`, `pipeline train` or `python -m pipeline.train`.

Data-parallel: `train.nproc: N` re-launches this stage under torchrun with N processes, and
`torchrun --nproc-per-node N -m pipeline.train` runs it directly (also across machines);
`train.batch_size` stays the global batch and rank 0 alone writes the outputs and the MLflow
run (see `pipeline.distributed`).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline import distributed, paths
from pipeline.checkpoint import arch_spec, build_model, load_checkpoint, save_checkpoint
from pipeline.config import Params, TrainConfig, load_params
from pipeline.data import DeviceData, load_prepared
from pipeline.engine import EpochCallback, FitResult, evaluate, fit, resolve_device
from pipeline.errors import StageFailed, stage_entry
from pipeline.files import write_json
from pipeline.plots import training_curves, write_csv
from pipeline.results import write_results
from pipeline.tracking import NullRun, stage_run

# metrics/train.json; the rest of the record (status, test accuracy and loss, epochs, parameter
# count, seconds, images/s, device) goes to reports/train.json
METRIC_KEYS = ("val_accuracy",)


@dataclass
class TrainOutcome:
    model: nn.Module
    arch: dict
    fit: FitResult
    metrics: dict  # the record for reports/train.json


def load_device_data(params: Params, worker_index: int = 0) -> DeviceData:
    """The prepared splits on this process's device (worker i takes GPU i mod count)."""
    device = resolve_device(params.device)
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        device = torch.device("cuda", worker_index % torch.cuda.device_count())
    channels_last = device.type == "cuda" and params.train.channels_last
    return DeviceData(load_prepared(paths.PREPARED_DIR), device, channels_last)


def train_and_evaluate(
    params: Params,
    data: DeviceData,
    train_cfg: TrainConfig | None = None,
    *,
    on_epoch: EpochCallback | None = None,
    description: str = "train",
) -> TrainOutcome:
    """Build the registry model (seeded), train it with the engine, score val and test."""
    train_cfg = train_cfg or params.train
    arch = arch_spec(params, data.info)
    torch.manual_seed(params.seed)
    model = build_model(arch)
    result = fit(
        model, data, train_cfg, seed=params.seed, on_epoch=on_epoch, description=description
    )
    return scored(model, arch, result, train_cfg, data)


def scored(
    model: nn.Module, arch: dict, result: FitResult, train_cfg: TrainConfig, data: DeviceData
) -> TrainOutcome:
    """The outcome of a training `fit` returned as `result`: its record, with the test split
    scored (once, for the report) when it trained to the end."""
    metrics = {"status": result.status, "message": result.message}
    if result.status == "ok":
        val_accuracy = result.val_accuracy  # the engine scored val after the last epoch
        test_loss, test_accuracy = evaluate(model, data.x["test"], data.y["test"], train_cfg.amp)
        metrics.update(
            val_accuracy=round(val_accuracy, 6),
            test_accuracy=round(test_accuracy, 6),
            test_loss=round(test_loss, 6),
        )
    metrics.update(
        epochs=result.epochs_run,
        train_seconds=round(result.train_seconds, 3),
        images_per_second=round(result.images_per_second, 1),
        device=result.device,
        processes=result.processes,
        params=sum(p.numel() for p in model.parameters()),
    )
    return TrainOutcome(model, arch, result, metrics)


def _launches(params: Params) -> bool:
    """True when this process is to start `train.nproc` > 1 ranks under torchrun (it is not
    one of them already)."""
    return params.train.nproc > 1 and not distributed.launched()


def train_recipe(params: Params, data: DeviceData, stage: str, description: str) -> TrainOutcome:
    """`train_and_evaluate(params, data)`, data-parallel in `params.train.nproc` processes under
    torchrun when that is > 1 and this process is not a rank already (the search's final
    retrain): the ranks (`pipeline.train_job`) train their shards and rank 0 writes the model
    and the record to a temporary checkpoint, read back here; the model comes back on
    `data.device`. A failed rank raises StageFailed naming `stage`."""
    if not _launches(params):
        return train_and_evaluate(params, data, params.train, description=description)
    with tempfile.TemporaryDirectory(prefix=f"{stage}-ddp-") as tmp:
        job = Path(tmp)
        write_json(job / "recipe.json", params.to_dict())
        args = (str(job), stage, description)
        distributed.launch(params.train.nproc, "pipeline.train_job", stage, data.device, args)
        model, blob = load_checkpoint(job / "model.pt")
    record = dict(blob["metrics"])
    fit_result = FitResult(**record.pop("fit"))
    return TrainOutcome(model.to(data.device), blob["arch"], fit_result, record)


def relaunched(params: Params, stage: str) -> bool:
    """With `train.nproc` > 1 in a process torchrun did not start: run stage `stage`
    (`pipeline.<stage>`) under torchrun in that many processes, wait, and return True (the
    caller returns); False when this process is to do the stage's work itself."""
    if not _launches(params):
        return False
    load_prepared(paths.PREPARED_DIR)  # a missing dataset: one error here, not one per rank
    device = resolve_device(params.device)
    distributed.launch(params.train.nproc, f"pipeline.{stage}", stage, device)
    return True


def run(
    params: Params, data: DeviceData | None = None, on_epoch: EpochCallback | None = None
) -> TrainOutcome:
    """Train the baseline with `train.*` on `data` (`load_device_data(params)` when None); no
    file output. The record for `reports/train.json` is `TrainOutcome.metrics`."""
    return train_and_evaluate(params, data or load_device_data(params), on_epoch=on_epoch)


def write_outputs(outcome: TrainOutcome, params: Params, info: dict) -> None:
    """models/baseline.pt, metrics/ and reports/train.json, plots/train_curve.{csv,png}."""
    m = outcome.metrics
    save_checkpoint(paths.BASELINE_CKPT, outcome.model, outcome.arch, params, info, m)
    write_results("train", m, METRIC_KEYS)
    write_csv(paths.PLOTS_DIR / "train_curve.csv", outcome.fit.history)
    training_curves(
        outcome.fit.history,
        paths.PLOTS_DIR / "train_curve.png",
        f"baseline {params.model.name} on {info['name']}",
    )


def _train_and_write(params: Params, data: DeviceData) -> TrainOutcome:
    """Train (every rank), then write the outputs and the MLflow run (rank 0 alone)."""
    info = data.info
    main_rank = distributed.is_main()
    with (
        stage_run("train", params, info["sha256"]["all"])
        if main_rank
        else contextlib.nullcontext(NullRun())
    ) as tracker:
        tracker.log_params(params.to_dict())
        outcome = run(params, data, on_epoch=lambda epoch, m: tracker.log_metrics(m, step=epoch))
        if outcome.fit.status != "ok":
            tracker.set_tags({"status": outcome.fit.status})
            raise StageFailed(f"train: {outcome.fit.message}; lower train.lr")
        if main_rank:
            write_outputs(outcome, params, info)
        per_epoch = set(outcome.fit.history[0])
        tracker.log_metrics({k: v for k, v in outcome.metrics.items() if k not in per_epoch})
        tracker.log_artifact(paths.PLOTS_DIR / "train_curve.png", "plots")
    return outcome


@stage_entry
def main(argv: list[str] | None = None) -> None:
    params = load_params(paths.PARAMS)
    if relaunched(params, "train"):
        return
    data = load_device_data(params, distributed.local_rank())
    with distributed.process_group(data.device, params.train.ddp_timeout_s, "train"):
        outcome = _train_and_write(params, data)
    if not distributed.is_main():
        return
    m = outcome.metrics
    print(
        f"baseline {params.model.name}: val {m['val_accuracy']:.4f}, test "
        f"{m['test_accuracy']:.4f}, {m['epochs']} epochs in {m['train_seconds']:.1f}s "
        f"({m['images_per_second']:.0f} img/s on {m['device']})",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
