"""compress stage: structured pruning + fine-tuning, int8 and fp16 ONNX, each judged on val.

Reads: params.yaml (`seed`, `device`, `compress`, `tracking`), `models/tuned.pt` (its resolved
`train` config drives the fine-tuning), `data/prepared/`.
Writes: `models/compressed/` (`pruned.pt`: checkpoint with the pruned widths, tensors only;
`model_fp32.onnx`, `model_pruned_fp32.onnx`, `model_int8.onnx`, `model_fp16.onnx`),
`metrics/compress.json` (the pruned model's MACs),
`reports/compress.json` (the whole record), `plots/compression.csv`, `plots/compression.png`;
one MLflow run with the params, every variant's metrics, the fine-tuning curves, the plot and
the ONNX files. Run: `dvc repro compress`, `pipeline compress` or `python -m pipeline.compress`.
`train.nproc: N` (params.yaml's, not the checkpoint's) fine-tunes data-parallel in N processes
under torchrun: every rank runs the ratio search (`prune_tuned`), rank 0 alone the rest.

1. `pipeline.pruning` (Torch-Pruning, DepGraph) removes `compress.prune_ratio` of the channels
   of every prunable layer in `prune_steps` steps; the shared engine fine-tunes after each with
   the tuned settings at `compress.finetune_lr` (null: the tuned `train.lr` / 2), cosine.
2. Guard, on the val split only, each side measured the same way. A prune attempt (PyTorch,
   fp32, no autocast) is compared with the tuned PyTorch model evaluated identically on the
   same device; an ONNX variant with the dense fp32 ONNX model, both in ONNX Runtime on the
   CPU. The comparison is paired (`pipeline.stats.paired_difference`, the same images): the
   accuracy difference, its 95 % paired-bootstrap interval and the images that disagree. A
   candidate is within budget when the point estimate loses at most `max_accuracy_drop`. An
   attempt over budget makes the stage bisect the ratio between 0 and `prune_ratio` for
   `backoff_steps` steps; it keeps the largest ratio within budget, or, when none is, the most
   accurate on val (then reported rejected). Every ratio tried is recorded
   (`pipeline.ratio_search`; why the point estimate and not the interval: there).
3. The pruned model is exported to fp32 ONNX, quantized to int8 (ORT static QDQ, calibrated on
   training pixels) and converted to fp16. Every ONNX file takes uint8 NHWC pixels and
   normalises them in its graph (`onnx_tools.export_onnx`); ONNX Runtime is fed the prepared
   uint8 images, PyTorch the normalised floats of `DeviceData`. Every variant is `accepted`
   only when within budget on val; a rejected one carries the reason and must not be shipped
   (the export stage reads `accepted`). Files and scores: `pipeline.onnx_variants`.
4. Only then is the test split scored, once per variant, for the report (`<name>_test_accuracy`
   beside `<name>_val_accuracy` in `reports/compress.json`, names from `pipeline.variants`);
   no choice reads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from pipeline import distributed, paths
from pipeline.checkpoint import build_model, load_checkpoint, pruned_spec, save_checkpoint
from pipeline.config import CompressConfig, Params, load_params, parse_params
from pipeline.data import DeviceData
from pipeline.engine import EpochCallback, correct_per_image
from pipeline.errors import ConfigError, DataError, stage_entry
from pipeline.onnx_variants import Variant, export_fp32, export_variants, measure, score_test
from pipeline.plots import compression_plot, write_csv
from pipeline.pruning import count_macs_params, finetune_config, pruned_widths
from pipeline.ratio_search import (
    PruneAttempt,
    attempts_note,
    judge,
    prune_attempt,
    reuse_equal_widths,
    search_ratio,
)
from pipeline.reporting import compress_table, difference_metrics
from pipeline.results import write_results
from pipeline.tracking import NullRun, stage_run
from pipeline.train import load_device_data, relaunched
from pipeline.variants import REFERENCE, VARIANTS

PLOT_COLUMNS = "name val_accuracy test_accuracy size_bytes params macs accepted".split()


@dataclass
class CompressOutcome:
    model: nn.Module  # the pruned, fine-tuned model (CPU, eval)
    arch: dict  # the tuned arch plus its `pruned` widths: what `pruned.pt` records
    attempts: list[PruneAttempt]
    variants: list[Variant]
    metrics: dict
    params: Params  # the tuned model's resolved params with this run's `compress`


def resolve_params(blob: dict, params: Params) -> Params:
    """The tuned model's resolved params (its `train` is what search found), with this run's
    `seed`, `device`, `tracking` and `compress`; params.yaml's when the checkpoint has none."""
    try:
        if not blob.get("config"):
            raise ConfigError("it has none")
        tuned = parse_params(blob["config"])
    except ConfigError as err:
        warnings.warn(f"tuned checkpoint config unusable ({err}); using params.yaml", stacklevel=2)
        return params
    kept = {key: getattr(params, key) for key in ("seed", "device", "tracking", "compress")}
    # processes are this machine's choice, not a tuned hyperparameter
    processes = {key: getattr(params.train, key) for key in ("nproc", "ddp_timeout_s")}
    return dataclasses.replace(tuned, train=dataclasses.replace(tuned.train, **processes), **kept)


@dataclass
class Pruning:
    """The ratio search's result: what every rank computes under torchrun."""

    tuned: nn.Module
    blob: dict  # the tuned checkpoint
    resolved: Params
    chosen: PruneAttempt
    attempts: list[PruneAttempt]


def prune_tuned(
    params: Params, data: DeviceData, tuned_path: str | Path, on_epoch: EpochCallback | None
) -> Pruning:
    """Load the tuned model and search the prune ratio (`pipeline.ratio_search`). Under
    torchrun every rank runs this: the fine-tuning is data-parallel, and each rank scores the
    same model on all of val, so all make the same choices."""
    tuned, blob = load_checkpoint(tuned_path)
    resolved = resolve_params(blob, params)
    cfg = params.compress
    tuned_correct = correct_per_image(tuned, data)  # the attempts' reference: PyTorch, like them
    attempt = reuse_equal_widths(
        lambda ratio: prune_attempt(tuned, data, resolved, tuned_correct, ratio, on_epoch),
        lambda ratio: pruned_widths(tuned, data, ratio, cfg, resolved.train),
    )
    chosen, attempts = search_ratio(cfg.prune_ratio, cfg.backoff_steps, attempt)
    return Pruning(tuned, blob, resolved, chosen, attempts)


def run(
    params: Params,
    tuned_path: str | Path = paths.TUNED_CKPT,
    out_dir: str | Path = paths.COMPRESSED_DIR,
    data: DeviceData | None = None,
    on_epoch: EpochCallback | None = None,
) -> CompressOutcome:
    """Prune, fine-tune and quantize the tuned model; its ONNX variants go to `out_dir`.

    Every choice reads the val split; the test split is scored last (`score_test`). Returns the
    pruned model, its arch (with the pruned widths), every pruning attempt, every variant
    (scored and judged) and the record for `reports/compress.json`. Under torchrun this is
    rank 0's part; the other ranks run `prune_tuned` alone.
    """
    cfg = params.compress
    data = data or load_device_data(params)
    pruning = prune_tuned(params, data, tuned_path, on_epoch)
    tuned, blob, resolved = pruning.tuned, pruning.blob, pruning.resolved
    chosen, attempts = pruning.chosen, pruning.attempts
    files = {v.name: Path(out_dir) / v.source.name for v in VARIANTS}
    metadata = {"classes": blob["classes"], "normalization": blob["normalization"]}
    metadata["source_checkpoint"] = str(tuned_path)
    dense_size = count_macs_params(tuned, data.x["train"][:1].cpu())[::-1]
    export_fp32(tuned, files[REFERENCE], data, metadata | {"variant": REFERENCE})
    dense, dense_pred = measure(REFERENCE, files[REFERENCE], data, dense_size)
    dense.accepted, dense.reason = True, "reference: the tuned model"
    export_variants(chosen.model, files, data, metadata, resolved)
    size, dense_correct = (chosen.params, chosen.macs), dense_pred == data.y["val"].cpu().numpy()
    fp32, fp32_pred = measure(
        "pruned_fp32", files["pruned_fp32"], data, size, dense_correct, dense_pred
    )
    variants = [dense, fp32] + [
        measure(name, files[name], data, size, dense_correct, fp32_pred)[0]
        for name in ("int8", "fp16")
    ]
    for variant in variants[1:]:
        variant.accepted, variant.reason = judge(variant.val_difference, cfg.max_accuracy_drop)
    fp32.reason += attempts_note(chosen, attempts)
    score_test(variants, data)  # after every choice above: reported, never read by them
    base_arch = {k: v for k, v in blob["arch"].items() if k != "pruned"}
    arch = base_arch | {"pruned": pruned_spec(build_model(base_arch), chosen.model)}
    metrics = summarize(cfg, chosen, attempts, variants, len(data.y["test"]))
    metrics["finetune_processes"] = distributed.active_world_size()
    return CompressOutcome(chosen.model.eval(), arch, attempts, variants, metrics, resolved)


def summarize(
    cfg: CompressConfig,
    chosen: PruneAttempt,
    attempts: list[PruneAttempt],
    variants: list[Variant],
    test_images: int,
) -> dict:
    """reports/compress.json: flat keys per variant, the ratios tried, the variants list
    (`METRIC_KEYS` of it go to metrics/compress.json)."""
    by_name = {v.name: v for v in variants}
    dense, int8 = by_name[REFERENCE], by_name["int8"]
    metrics = {
        "prune_ratio_requested": cfg.prune_ratio,
        "prune_ratio": chosen.ratio,
        "max_accuracy_drop": cfg.max_accuracy_drop,
        "guard": "point estimate of the paired val difference to the tuned model",
        "val_images": dense.val_difference.n_images,
        "test_images": test_images,
        "macs_before": dense.macs,
        "macs_after": chosen.macs,
        "params_before": dense.params,
        "params_after": chosen.params,
        "macs_reduction": round(dense.macs / max(chosen.macs, 1), 4),
        "int8_size_ratio": round(int8.size_bytes / dense.size_bytes, 4),
        # the attempts' reference: the tuned model in PyTorch, as the attempts were measured
        "tuned_pytorch_val_accuracy": round(
            attempts[0].val_accuracy - attempts[0].val_difference.difference, 6
        ),
    }
    for variant in variants:
        name = variant.name
        metrics[f"{name}_val_accuracy"] = round(variant.val_accuracy, 6)
        metrics[f"{name}_test_accuracy"] = round(variant.test_accuracy, 6)
        if variant is not dense:
            metrics |= difference_metrics(name, variant.val_difference.record())
        metrics[f"{name}_size_bytes"] = variant.size_bytes
        metrics[f"{name}_accepted"] = variant.accepted
    metrics["int8_agreement"] = round(int8.agreement, 6)
    metrics["fp16_agreement"] = round(by_name["fp16"].agreement, 6)
    metrics["finetune_seconds"] = round(sum(a.finetune_seconds for a in attempts), 3)
    metrics["attempts"] = [a.record() for a in attempts]
    metrics["variants"] = [v.record() for v in variants]
    return metrics


# metrics/compress.json; the whole record (every variant, the ratios tried, flags, seconds)
# goes to reports/compress.json, which export reads
METRIC_KEYS = ("macs_after",)


def write_outputs(outcome: CompressOutcome, info: dict) -> None:
    """pruned.pt, metrics/ and reports/compress.json, plots/compression.{csv,png} (ONNX
    files: `run`)."""
    m = outcome.metrics
    save_checkpoint(paths.PRUNED_CKPT, outcome.model, outcome.arch, outcome.params, info, m)
    write_results("compress", m, METRIC_KEYS)
    write_csv(paths.PLOTS_DIR / "compression.csv", m["variants"], PLOT_COLUMNS)
    compression_plot(m["variants"], m["max_accuracy_drop"], paths.PLOTS_DIR / "compression.png")


def log_outcome(tracker, outcome: CompressOutcome) -> None:
    """Every variant's metrics, the ratios tried, accepted flags as tags, plot and ONNX files."""
    # the fine-tuning hyperparameters: the tuned checkpoint's, with compress's lr and schedule
    finetune = finetune_config(outcome.params.train, outcome.params.compress)
    tracker.log_params({"finetune": dataclasses.asdict(finetune)})
    tracker.log_metrics(outcome.metrics)  # the numbers; lists, strings and flags are dropped
    for i, attempt in enumerate(outcome.attempts):
        values = {"attempt_ratio": attempt.ratio, "attempt_val_accuracy": attempt.val_accuracy}
        tracker.log_metrics(values, step=i)
    tracker.set_tags({f"{v.name}_accepted": v.accepted for v in outcome.variants})
    tracker.log_artifact(paths.PLOTS_DIR / "compression.png", "plots")
    for variant in outcome.variants:
        tracker.log_artifact(variant.path, "onnx")


@stage_entry
def main(argv: list[str] | None = None) -> None:
    params = load_params(paths.PARAMS)
    if not paths.TUNED_CKPT.is_file():
        raise DataError(f"{paths.TUNED_CKPT}: not found; run the search stage first (dvc repro)")
    if relaunched(params, "compress"):  # the fine-tuning data-parallel, under torchrun
        return
    data = load_device_data(params, distributed.local_rank())
    main_rank = distributed.is_main()
    step = itertools.count(1)  # fine-tuning epochs of every attempt, in order
    with (
        distributed.process_group(data.device, params.train.ddp_timeout_s, "compress"),
        stage_run("compress", params, data.info["sha256"]["all"])
        if main_rank
        else contextlib.nullcontext(NullRun()) as tracker,
    ):
        tracker.log_params(params.to_dict())

        def log_epoch(epoch: int, metrics: dict) -> None:
            values = {f"finetune_{k}": v for k, v in metrics.items() if k != "epoch"}
            tracker.log_metrics(values, step=next(step))

        if not main_rank:  # a data-parallel rank: its part is the fine-tuning
            prune_tuned(params, data, paths.TUNED_CKPT, log_epoch)
            return
        outcome = run(params, data=data, on_epoch=log_epoch)
        write_outputs(outcome, data.info)
        log_outcome(tracker, outcome)
    print(compress_table(outcome.metrics), file=sys.stderr)


if __name__ == "__main__":
    main()
