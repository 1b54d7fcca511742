"""compress stage: structured pruning + fine-tuning, int8 and fp16 ONNX, each judged on val.

Reads: params.yaml (`seed`, `device`, `compress`, `tracking`), `models/tuned.pt` (its resolved
`train` config drives the fine-tuning), `data/prepared/`.
Writes: `models/compressed/` (`pruned.pt`: checkpoint with the pruned widths, tensors only;
`dense_fp32.onnx`, `pruned_fp32.onnx`, `pruned_int8.onnx`, `pruned_fp16.onnx`),
`metrics/compress.json`, `plots/compression.csv`, `plots/compression.png`; one MLflow run with
the params, every variant's metrics, the fine-tuning curves, the plot and the ONNX files.
Run: `dvc repro compress`, `pipeline compress` or `python -m pipeline.compress`.

1. `pipeline.pruning` (Torch-Pruning, DepGraph) removes `compress.prune_ratio` of the channels
   of every prunable layer (L2 magnitude importance; the classifier and a torchvision input
   adapter are kept; widths rounded to a multiple of `round_to`) in `prune_steps` steps. The
   shared engine fine-tunes after each step (`finetune_epochs // prune_steps` epochs, at least
   1, between steps, `finetune_epochs` after the last) with the tuned settings at a low lr:
   `compress.finetune_lr` (null: the tuned `train.lr` / 2), cosine decay, no warm-up.
2. Guard, on the val split only, each side measured the same way. A prune attempt (PyTorch,
   fp32, no autocast) is compared with the tuned PyTorch model evaluated identically on the
   same device; an ONNX variant with the dense fp32 ONNX model, both in ONNX Runtime on the
   CPU. The comparison is paired (`pipeline.stats.paired_difference`, the same images): the
   accuracy difference, its 95 % paired-bootstrap interval and the images that disagree. A
   candidate is within budget when the point estimate loses at most `max_accuracy_drop`. An
   attempt over budget makes the stage bisect the ratio between 0 and `prune_ratio` for
   `backoff_steps` steps; it keeps the largest ratio within budget, or, when none is, the most
   accurate on val (then reported rejected). Every ratio tried is recorded.
3. The pruned model is exported to fp32 ONNX, quantized to int8 (ORT static QDQ) and converted
   to fp16. Every variant is `accepted` only when within budget on val; a rejected one carries
   the reason and must not be shipped (the export stage reads `accepted`).
4. Only then is the test split scored, once per variant, for the report (`<short>_test_accuracy`
   beside `<short>_val_accuracy` in `metrics/compress.json`); no choice reads it.

Why the point estimate, not the interval's bound: it is the unbiased estimate of what a
variant loses, while the interval measures how few images there are. On the default split (270
val images, one image = 0.37 points) two equally good models that disagree on a handful of
images already have a 95 % interval wider than a 1-point budget (README, compress section), so
"the whole interval within budget" would reject models that lose nothing. The interval and the
count of disagreeing images are reported beside every verdict.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline import onnx_tools, paths
from pipeline.checkpoint import build_model, load_checkpoint, pruned_spec, save_checkpoint
from pipeline.config import CompressConfig, Params, load_params, parse_params
from pipeline.data import DeviceData
from pipeline.engine import EpochCallback, correct_per_image
from pipeline.errors import ConfigError, DataError, stage_entry
from pipeline.files import write_json
from pipeline.plots import compression_plot, write_csv
from pipeline.pruning import count_macs_params, finetune_config, prune_and_finetune, pruned_widths
from pipeline.reporting import compress_table, difference_metrics
from pipeline.stats import PairedDifference, paired_difference
from pipeline.tracking import stage_run
from pipeline.train import load_device_data

VARIANT_FILES = {
    "dense_fp32": paths.DENSE_FP32_ONNX.name,
    "pruned_fp32": paths.PRUNED_FP32_ONNX.name,
    "pruned_int8": paths.PRUNED_INT8_ONNX.name,
    "pruned_fp16": paths.PRUNED_FP16_ONNX.name,
}
# variant -> prefix of its flat keys in metrics/compress.json (`int8_val_accuracy`, ...)
SHORT_NAMES = {
    "dense_fp32": "tuned",
    "pruned_fp32": "pruned",
    "pruned_int8": "int8",
    "pruned_fp16": "fp16",
}
PLOT_COLUMNS = "name val_accuracy test_accuracy size_bytes params macs accepted".split()


@dataclass
class PruneAttempt:
    ratio: float
    val_accuracy: float  # the fine-tuned pruned model in PyTorch fp32 (no autocast)
    val_difference: PairedDifference  # vs the tuned model, evaluated the same way
    macs: int
    params: int
    within_budget: bool
    status: str  # "ok", or "diverged" when fine-tuning blew up
    finetune_seconds: float = 0.0
    same_widths_as: float | None = None  # an earlier ratio that gave the same network
    model: nn.Module | None = field(default=None, repr=False)

    def record(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        return out | {
            "val_accuracy": round(self.val_accuracy, 6),
            "val_difference": self.val_difference.record(),
        }


@dataclass
class Variant:
    name: str
    path: Path
    val_accuracy: float  # ONNX Runtime on the CPU, val split: what the guard reads
    val_difference: PairedDifference  # vs dense_fp32 on the same images, same runtime
    size_bytes: int
    params: int
    macs: int
    agreement: float  # val top-1 agreement with the fp32 model it came from
    provider: str
    accepted: bool = False
    reason: str = ""
    test_accuracy: float = float("nan")  # scored once, after every decision (report only)

    def record(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)} | {"path": str(self.path)}
        rounded = {k: round(out[k], 6) for k in ("val_accuracy", "test_accuracy", "agreement")}
        return out | rounded | {"val_difference": self.val_difference.record()}


@dataclass
class CompressOutcome:
    model: nn.Module  # the pruned, fine-tuned model (CPU, eval)
    arch: dict  # the tuned arch plus its `pruned` widths: what `pruned.pt` records
    attempts: list[PruneAttempt]
    variants: list[Variant]
    metrics: dict
    params: Params  # the tuned model's resolved params with this run's `compress`


def judge(difference: PairedDifference, max_drop: float) -> tuple[bool, str]:
    """(accepted, why): the point estimate of the paired val difference to the tuned model may
    lose at most `max_drop` (the interval is reported beside it; see the module docstring)."""
    detail = f"val {difference.describe()} vs tuned"
    if difference.difference < -max_drop - 1e-9:
        return False, (
            f"loses {-100 * difference.difference:.2f} points ({detail}); "
            f"compress.max_accuracy_drop allows {100 * max_drop:.2f}"
        )
    return True, f"within budget ({detail}; max drop {100 * max_drop:.2f} points)"


def prune_attempt(
    tuned: nn.Module,
    data: DeviceData,
    params: Params,
    tuned_correct: np.ndarray,
    ratio: float,
    on_epoch: EpochCallback | None = None,
) -> PruneAttempt:
    """Prune and fine-tune a copy of `tuned` at `ratio`; compare it with the tuned model on val.

    `tuned_correct`: the tuned model's `correct_per_image` on val (same device, fp32, no autocast).
    """
    model = copy.deepcopy(tuned)
    torch.manual_seed(params.seed)
    fits = prune_and_finetune(
        model, data, ratio, params.compress, params.train, seed=params.seed, on_epoch=on_epoch
    )
    status = "ok" if all(f.status == "ok" for f in fits) else "diverged"
    correct = correct_per_image(model, data)
    difference = paired_difference(correct, tuned_correct)
    macs, n_params = count_macs_params(model.cpu(), data.x["train"][:1].cpu())
    within = judge(difference, params.compress.max_accuracy_drop)[0] and status == "ok"
    seconds = round(sum(f.train_seconds for f in fits), 3)
    accuracy = float(correct.mean())
    args = (ratio, accuracy, difference, macs, n_params, within, status, seconds)
    return PruneAttempt(*args, model=model)


def reuse_equal_widths(
    attempt: Callable[[float], PruneAttempt], widths: Callable[[float], str]
) -> Callable[[float], PruneAttempt]:
    """Wrap `attempt` so a ratio that gives already-tried widths reuses that attempt.

    With `round_to`, nearby ratios often give the same network (a 16-channel layer stays at 8
    for every ratio in (0.25, 0.5]); bisection would fine-tune it again for nothing.
    """
    tried: dict[str, PruneAttempt] = {}

    def cached(ratio: float) -> PruneAttempt:
        key = widths(ratio)
        if key in tried:
            first = tried[key]
            return dataclasses.replace(
                first, ratio=ratio, finetune_seconds=0.0, same_widths_as=first.ratio
            )
        tried[key] = attempt(ratio)
        return tried[key]

    return cached


def search_ratio(
    ratio: float, backoff_steps: int, attempt: Callable[[float], PruneAttempt]
) -> tuple[PruneAttempt, list[PruneAttempt]]:
    """Try `ratio`; if over budget, bisect between 0 and it. (kept attempt, every attempt).

    Keeps the largest ratio within budget; when none is, the most accurate attempt (on val).
    """
    tried = [attempt(ratio)]
    if tried[0].within_budget:
        return tried[0], tried
    low, high, best = 0.0, ratio, None
    for _ in range(backoff_steps):
        mid = round((low + high) / 2, 6)
        tried.append(attempt(mid))
        if tried[-1].within_budget:
            low, best = mid, tried[-1]
        else:
            high = mid
    if best is None:
        best = max(tried, key=lambda a: (a.val_accuracy, -a.ratio))
    return best, tried


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
    return dataclasses.replace(tuned, **kept)


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().contiguous().numpy()


def calibration_images(data: DeviceData, count: int, seed: int) -> np.ndarray:
    """`count` training images (seeded random subset), normalised float32 NCHW."""
    n = len(data.y["train"])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(count, n)]
    return _numpy(data.x["train"][order.to(data.device)])


def export_variants(
    model: nn.Module, files: dict[str, Path], data: DeviceData, metadata: dict, params: Params
) -> None:
    """Write the pruned model's fp32, int8 (calibrated on training images) and fp16 ONNX."""
    shape = tuple(data.info["shape"])
    fp32 = files["pruned_fp32"]
    onnx_tools.export_onnx(model, fp32, shape, metadata | {"variant": "pruned_fp32"})
    calibration = calibration_images(data, params.compress.calibration_images, params.seed)
    onnx_tools.quantize_int8(
        fp32,
        files["pruned_int8"],
        calibration,
        params.compress.calibration_method,
        metadata={"variant": "pruned_int8"},
    )
    onnx_tools.convert_fp16(fp32, files["pruned_fp16"], metadata={"variant": "pruned_fp16"})


def onnx_predictions(path: Path, data: DeviceData, split: str) -> tuple[np.ndarray, str]:
    """(top-1 predictions on `split`, provider): ONNX Runtime on the CPU, for every variant."""
    session, provider = onnx_tools.make_session(path, "cpu")
    return onnx_tools.run_logits(session, _numpy(data.x[split])).argmax(1), provider


def measure(
    name: str, path: Path, data: DeviceData, size: tuple, reference_correct=None, source=None
) -> tuple[Variant, np.ndarray]:
    """Score an ONNX file on the val split; also its top-1 predictions there.

    `size` is (params, MACs); `reference_correct` the reference's per-image correctness (None:
    this is the reference); `source` the predictions of the fp32 model it came from.
    """
    predictions, provider = onnx_predictions(path, data, "val")
    correct = predictions == data.y["val"].cpu().numpy()
    reference = correct if reference_correct is None else reference_correct
    agreement = 1.0 if source is None else float((predictions == source).mean())
    difference = paired_difference(correct, reference)
    size_bytes = onnx_tools.file_size(path)
    variant = Variant(
        name, path, float(correct.mean()), difference, size_bytes, *size, agreement, provider
    )
    return variant, predictions


def score_test(variants: list[Variant], data: DeviceData) -> None:
    """Every variant's test accuracy, once, after every decision: for the report only."""
    labels = data.y["test"].cpu().numpy()
    for variant in variants:
        predictions, _ = onnx_predictions(variant.path, data, "test")
        variant.test_accuracy = float((predictions == labels).mean())


def _attempts_note(chosen: PruneAttempt, attempts: list[PruneAttempt]) -> str:
    tried = ", ".join(f"{a.ratio:g} -> val {a.val_accuracy:.4f}" for a in attempts)
    if not chosen.within_budget:
        return f"; no pruning ratio tried was within budget ({tried})"
    if len(attempts) > 1:
        return f"; backed off to ratio {chosen.ratio:g} ({tried})"
    return ""


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
    (scored and judged) and the metrics for `metrics/compress.json`.
    """
    cfg = params.compress
    data = data or load_device_data(params)
    tuned, blob = load_checkpoint(tuned_path)
    resolved = resolve_params(blob, params)
    files = {name: Path(out_dir) / file for name, file in VARIANT_FILES.items()}
    metadata = {"classes": blob["classes"], "normalization": blob["normalization"]}
    metadata["source_checkpoint"] = str(tuned_path)
    dense_size = count_macs_params(tuned, data.x["train"][:1].cpu())[::-1]
    shape = tuple(data.info["shape"])
    onnx_tools.export_onnx(tuned, files["dense_fp32"], shape, metadata | {"variant": "dense_fp32"})
    dense, dense_pred = measure("dense_fp32", files["dense_fp32"], data, dense_size)
    dense.accepted, dense.reason = True, "reference: the tuned model"
    tuned_correct = correct_per_image(tuned, data)  # the attempts' reference: PyTorch, like them

    attempt = reuse_equal_widths(
        lambda ratio: prune_attempt(tuned, data, resolved, tuned_correct, ratio, on_epoch),
        lambda ratio: pruned_widths(tuned, data, ratio, cfg, resolved.train),
    )
    chosen, attempts = search_ratio(cfg.prune_ratio, cfg.backoff_steps, attempt)
    export_variants(chosen.model, files, data, metadata, resolved)
    size, dense_correct = (chosen.params, chosen.macs), dense_pred == data.y["val"].cpu().numpy()
    fp32, fp32_pred = measure(
        "pruned_fp32", files["pruned_fp32"], data, size, dense_correct, dense_pred
    )
    variants = [dense, fp32] + [
        measure(name, files[name], data, size, dense_correct, fp32_pred)[0]
        for name in ("pruned_int8", "pruned_fp16")
    ]
    for variant in variants[1:]:
        variant.accepted, variant.reason = judge(variant.val_difference, cfg.max_accuracy_drop)
    fp32.reason += _attempts_note(chosen, attempts)
    score_test(variants, data)  # after every choice above: reported, never read by them
    base_arch = {k: v for k, v in blob["arch"].items() if k != "pruned"}
    arch = base_arch | {"pruned": pruned_spec(build_model(base_arch), chosen.model)}
    metrics = summarize(cfg, chosen, attempts, variants, len(data.y["test"]))
    return CompressOutcome(chosen.model.eval(), arch, attempts, variants, metrics, resolved)


def summarize(
    cfg: CompressConfig,
    chosen: PruneAttempt,
    attempts: list[PruneAttempt],
    variants: list[Variant],
    test_images: int,
) -> dict:
    """metrics/compress.json: flat keys per variant, the ratios tried, the variants list."""
    by_name = {v.name: v for v in variants}
    dense, int8 = by_name["dense_fp32"], by_name["pruned_int8"]
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
        short = SHORT_NAMES[variant.name]
        metrics[f"{short}_val_accuracy"] = round(variant.val_accuracy, 6)
        metrics[f"{short}_test_accuracy"] = round(variant.test_accuracy, 6)
        if variant is not dense:
            metrics |= difference_metrics(short, variant.val_difference.record())
        metrics[f"{short}_size_bytes"] = variant.size_bytes
        metrics[f"{short}_accepted"] = variant.accepted
    metrics["int8_agreement"] = round(int8.agreement, 6)
    metrics["fp16_agreement"] = round(by_name["pruned_fp16"].agreement, 6)
    metrics["finetune_seconds"] = round(sum(a.finetune_seconds for a in attempts), 3)
    metrics["attempts"] = [a.record() for a in attempts]
    metrics["variants"] = [v.record() for v in variants]
    return metrics


def write_outputs(outcome: CompressOutcome, info: dict) -> None:
    """pruned.pt, metrics/compress.json, plots/compression.{csv,png} (ONNX files: `run`)."""
    m = outcome.metrics
    save_checkpoint(paths.PRUNED_CKPT, outcome.model, outcome.arch, outcome.params, info, m)
    write_json(paths.METRICS_DIR / "compress.json", m)
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
    data = load_device_data(params)
    step = itertools.count(1)  # fine-tuning epochs of every attempt, in order
    with stage_run("compress", params, data.info["sha256"]["all"]) as tracker:
        tracker.log_params(params.to_dict())

        def log_epoch(epoch: int, metrics: dict) -> None:
            values = {f"finetune_{k}": v for k, v in metrics.items() if k != "epoch"}
            tracker.log_metrics(values, step=next(step))

        outcome = run(params, data=data, on_epoch=log_epoch)
        write_outputs(outcome, data.info)
        log_outcome(tracker, outcome)
    print(compress_table(outcome.metrics), file=sys.stderr)


if __name__ == "__main__":
    main()
