"""compress stage: structured pruning + fine-tuning, int8 and fp16 ONNX, each variant measured.

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
   shared engine fine-tunes after each step: `finetune_epochs // prune_steps` epochs (at least
   1) between steps, `finetune_epochs` after the last.
2. Guard: the tuned model's test accuracy (ONNX Runtime) is the reference. A pruned model that
   loses more than `max_accuracy_drop` makes the stage bisect the ratio between 0 and
   `prune_ratio` for `backoff_steps` steps; it keeps the largest ratio within budget, or, when
   none is, the most accurate one tried (then reported rejected). Every ratio tried is recorded.
3. The pruned model is exported to fp32 ONNX, quantized to int8 (ORT static QDQ) and converted
   to fp16. Every variant is scored on the test split with ONNX Runtime (accuracy, size, params,
   MACs, top-1 agreement with fp32) and is `accepted` only when within budget; a rejected
   variant carries the reason and must not be shipped (the export stage reads `accepted`).
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
from pipeline.engine import EpochCallback, evaluate
from pipeline.errors import ConfigError, DataError, cli_entry
from pipeline.io import write_json
from pipeline.plots import save_figure, write_csv
from pipeline.pruning import count_macs_params, prune_and_finetune, pruned_widths
from pipeline.tracking import stage_run
from pipeline.train import load_device_data

VARIANT_FILES = {
    "dense_fp32": paths.DENSE_FP32_ONNX.name,
    "pruned_fp32": paths.PRUNED_FP32_ONNX.name,
    "pruned_int8": paths.PRUNED_INT8_ONNX.name,
    "pruned_fp16": paths.PRUNED_FP16_ONNX.name,
}
# variant -> prefix of its flat keys in metrics/compress.json (`int8_accuracy`, ...)
SHORT_NAMES = {
    "dense_fp32": "tuned",
    "pruned_fp32": "pruned",
    "pruned_int8": "int8",
    "pruned_fp16": "fp16",
}
PLOT_COLUMNS = ["name", "accuracy", "size_bytes", "params", "macs", "accepted"]


@dataclass
class PruneAttempt:
    ratio: float
    accuracy: float  # test top-1 of the fine-tuned pruned model (PyTorch)
    macs: int
    params: int
    within_budget: bool
    status: str  # "ok", or "diverged" when fine-tuning blew up
    finetune_seconds: float = 0.0
    same_widths_as: float | None = None  # an earlier ratio that gave the same network
    model: nn.Module | None = field(default=None, repr=False)

    def record(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        return out | {"accuracy": round(self.accuracy, 6)}


@dataclass
class Variant:
    name: str
    path: Path
    accuracy: float  # test top-1 in ONNX Runtime
    size_bytes: int
    params: int
    macs: int
    agreement: float  # top-1 agreement with the fp32 model it came from
    provider: str
    accepted: bool = False
    reason: str = ""

    def record(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)} | {"path": str(self.path)}
        return out | {k: round(out[k], 6) for k in ("accuracy", "agreement")}


@dataclass
class CompressOutcome:
    model: nn.Module  # the pruned, fine-tuned model (CPU, eval)
    arch: dict  # the tuned arch plus its `pruned` widths: what `pruned.pt` records
    attempts: list[PruneAttempt]
    variants: list[Variant]
    metrics: dict
    params: Params  # the tuned model's resolved params with this run's `compress`


def judge(accuracy: float, reference: float, max_drop: float) -> tuple[bool, str]:
    """(accepted, why): a variant may lose at most `max_drop` accuracy against `reference`."""
    drop = reference - accuracy
    detail = f"test accuracy {accuracy:.4f} vs tuned {reference:.4f}"
    if drop > max_drop + 1e-9:
        return False, (
            f"loses {100 * drop:.2f} points ({detail}); compress.max_accuracy_drop allows "
            f"{100 * max_drop:.2f}"
        )
    return True, f"within budget ({detail}; max drop {100 * max_drop:.2f} points)"


def prune_attempt(
    tuned: nn.Module,
    data: DeviceData,
    params: Params,
    reference: float,
    ratio: float,
    on_epoch: EpochCallback | None = None,
) -> PruneAttempt:
    """Prune and fine-tune a copy of `tuned` at `ratio`; score it on the test split."""
    model = copy.deepcopy(tuned)
    torch.manual_seed(params.seed)
    fits = prune_and_finetune(
        model, data, ratio, params.compress, params.train, seed=params.seed, on_epoch=on_epoch
    )
    status = "ok" if all(f.status == "ok" for f in fits) else "diverged"
    _, accuracy = evaluate(model, data.x["test"], data.y["test"], params.train.amp)
    macs, n_params = count_macs_params(model.cpu(), data.x["train"][:1].cpu())
    within, _ = judge(accuracy, reference, params.compress.max_accuracy_drop)
    seconds = round(sum(f.train_seconds for f in fits), 3)
    return PruneAttempt(
        ratio,
        accuracy,
        macs,
        n_params,
        within and status == "ok",
        status,
        finetune_seconds=seconds,
        model=model,
    )


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

    Keeps the largest ratio within budget; when none is, the most accurate attempt.
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
        best = max(tried, key=lambda a: (a.accuracy, -a.ratio))
    return best, tried


def resolve_params(blob: dict, params: Params) -> Params:
    """The tuned model's resolved params (its `train` is what search found), with this run's
    `seed`, `device`, `tracking` and `compress`; params.yaml's when the checkpoint has none."""
    try:
        tuned = parse_params(blob.get("config") or {})
    except ConfigError as err:
        warnings.warn(f"tuned checkpoint config unusable ({err}); using params.yaml", stacklevel=2)
        return params
    return dataclasses.replace(
        tuned,
        seed=params.seed,
        device=params.device,
        tracking=params.tracking,
        compress=params.compress,
    )


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


def measure(
    name: str, path: Path, data: DeviceData, device: str, size: tuple[int, int], source=None
) -> tuple[Variant, np.ndarray]:
    """Score an ONNX file on the test split in ONNX Runtime; also its top-1 predictions.

    `size` is (params, MACs); `source` the predictions of the fp32 model it came from.
    """
    session, provider = onnx_tools.make_session(path, device)
    predictions = onnx_tools.run_logits(session, _numpy(data.x["test"])).argmax(1)
    labels = data.y["test"].cpu().numpy()
    agreement = 1.0 if source is None else float((predictions == source).mean())
    accuracy = float((predictions == labels).mean())
    size_bytes = onnx_tools.file_size(path)
    variant = Variant(name, path, accuracy, size_bytes, *size, agreement, provider)
    return variant, predictions


def _attempts_note(chosen: PruneAttempt, attempts: list[PruneAttempt]) -> str:
    tried = ", ".join(f"{a.ratio:g} -> {a.accuracy:.4f}" for a in attempts)
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

    Returns the pruned model, its arch (with the pruned widths), every pruning attempt, every
    variant (scored and judged) and the metrics for `metrics/compress.json`.
    """
    cfg = params.compress
    data = data or load_device_data(params)
    tuned, blob = load_checkpoint(tuned_path)
    resolved = resolve_params(blob, params)
    files = {name: Path(out_dir) / file for name, file in VARIANT_FILES.items()}
    metadata = {
        "classes": blob["classes"],
        "normalization": blob["normalization"],
        "source_checkpoint": str(tuned_path),
    }
    dense_size = count_macs_params(tuned, data.x["train"][:1].cpu())[::-1]
    shape = tuple(data.info["shape"])
    onnx_tools.export_onnx(tuned, files["dense_fp32"], shape, metadata | {"variant": "dense_fp32"})
    dense, dense_pred = measure("dense_fp32", files["dense_fp32"], data, params.device, dense_size)
    dense.accepted, dense.reason = True, "reference: the tuned model"

    attempt = reuse_equal_widths(
        lambda ratio: prune_attempt(tuned, data, resolved, dense.accuracy, ratio, on_epoch),
        lambda ratio: pruned_widths(tuned, data, ratio, cfg, resolved.train),
    )
    chosen, attempts = search_ratio(cfg.prune_ratio, cfg.backoff_steps, attempt)
    export_variants(chosen.model, files, data, metadata, resolved)
    size = (chosen.params, chosen.macs)
    fp32, fp32_pred = measure(
        "pruned_fp32", files["pruned_fp32"], data, params.device, size, dense_pred
    )
    variants = [dense, fp32] + [
        measure(name, files[name], data, params.device, size, fp32_pred)[0]
        for name in ("pruned_int8", "pruned_fp16")
    ]
    for variant in variants[1:]:
        variant.accepted, variant.reason = judge(
            variant.accuracy, dense.accuracy, cfg.max_accuracy_drop
        )
    fp32.reason += _attempts_note(chosen, attempts)
    base_arch = {k: v for k, v in blob["arch"].items() if k != "pruned"}
    arch = base_arch | {"pruned": pruned_spec(build_model(base_arch), chosen.model)}
    metrics = summarize(cfg, chosen, attempts, variants)
    return CompressOutcome(chosen.model.eval(), arch, attempts, variants, metrics, resolved)


def summarize(
    cfg: CompressConfig, chosen: PruneAttempt, attempts: list[PruneAttempt], variants: list
) -> dict:
    """metrics/compress.json: flat keys per variant, the ratios tried, the variants list."""
    by_name = {v.name: v for v in variants}
    dense, int8 = by_name["dense_fp32"], by_name["pruned_int8"]
    metrics = {
        "prune_ratio_requested": cfg.prune_ratio,
        "prune_ratio": chosen.ratio,
        "max_accuracy_drop": cfg.max_accuracy_drop,
        "macs_before": dense.macs,
        "macs_after": chosen.macs,
        "params_before": dense.params,
        "params_after": chosen.params,
        "macs_reduction": round(dense.macs / max(chosen.macs, 1), 4),
        "int8_size_ratio": round(int8.size_bytes / dense.size_bytes, 4),
    }
    for variant in variants:
        short = SHORT_NAMES[variant.name]
        metrics[f"{short}_accuracy"] = round(variant.accuracy, 6)
        metrics[f"{short}_size_bytes"] = variant.size_bytes
        metrics[f"{short}_accepted"] = variant.accepted
    metrics["int8_agreement"] = round(int8.agreement, 6)
    metrics["fp16_agreement"] = round(by_name["pruned_fp16"].agreement, 6)
    metrics["finetune_seconds"] = round(sum(a.finetune_seconds for a in attempts), 3)
    metrics["attempts"] = [a.record() for a in attempts]
    metrics["variants"] = [v.record() for v in variants]
    return metrics


def tradeoff_plot(variants: list[Variant], max_drop: float, path: str | Path) -> None:
    """Accuracy against file size, one point per variant; the budget as a dashed line."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, v in enumerate(variants):
        color = "tab:green" if v.accepted else "tab:red"
        ax.scatter(v.size_bytes / 1024, v.accuracy, color=color, s=40, zorder=3)
        ax.annotate(  # staggered above / below: variants often share an accuracy
            v.name,
            (v.size_bytes / 1024, v.accuracy),
            textcoords="offset points",
            xytext=(4, 6 + 12 * (i // 2) if i % 2 else -12 - 12 * (i // 2)),
            fontsize=8,
        )
    ax.axhline(
        variants[0].accuracy - max_drop,
        color="gray",
        linestyle="--",
        linewidth=1,
        label="accuracy budget",
    )
    ax.margins(x=0.15, y=0.15)
    ax.set_xlabel("ONNX file size (KiB)")
    ax.set_ylabel("test top-1 accuracy")
    ax.set_title("compression: accepted (green) / rejected (red)")
    ax.legend(loc="lower right")
    save_figure(fig, path)


def _report(outcome: CompressOutcome) -> str:
    m = outcome.metrics
    lines = [
        f"pruned at ratio {m['prune_ratio']:g} (requested {m['prune_ratio_requested']:g}): "
        f"MACs {m['macs_before']:,} -> {m['macs_after']:,} ({m['macs_reduction']:.2f}x fewer), "
        f"params {m['params_before']:,} -> {m['params_after']:,}",
    ]
    if len(outcome.attempts) > 1:
        tried = ", ".join(f"{a.ratio:g} -> {a.accuracy:.4f}" for a in outcome.attempts)
        lines.append(f"over budget at {m['prune_ratio_requested']:g}; ratios tried: {tried}")
    lines.append(f"{'variant':<12} {'accuracy':>8} {'size':>12} {'MACs':>12}  accepted")
    for v in outcome.variants:
        verdict = "yes" if v.accepted else f"NO: {v.reason}"
        lines.append(
            f"{v.name:<12} {v.accuracy:>8.4f} {v.size_bytes / 1024:>8.1f} KiB {v.macs:>12,}  "
            f"{verdict}"
        )
    return "\n".join(lines)


def write_outputs(outcome: CompressOutcome, info: dict) -> None:
    """pruned.pt, metrics/compress.json, plots/compression.{csv,png} (ONNX files: `run`)."""
    m = outcome.metrics
    save_checkpoint(paths.PRUNED_CKPT, outcome.model, outcome.arch, outcome.params, info, m)
    write_json(paths.METRICS_DIR / "compress.json", m)
    rows = [v.record() for v in outcome.variants]
    write_csv(paths.PLOTS_DIR / "compression.csv", rows, PLOT_COLUMNS)
    tradeoff_plot(outcome.variants, m["max_accuracy_drop"], paths.PLOTS_DIR / "compression.png")


def log_outcome(tracker, outcome: CompressOutcome) -> None:
    """Every variant's metrics, the ratios tried, accepted flags as tags, plot and ONNX files."""
    # the fine-tuning hyperparameters come from the tuned checkpoint, not params.yaml's `train`
    tracker.log_params({"finetune": dataclasses.asdict(outcome.params.train)})
    flat = {k: v for k, v in outcome.metrics.items() if not isinstance(v, (list, bool))}
    tracker.log_metrics(flat)
    for i, attempt in enumerate(outcome.attempts):
        tracker.log_metrics(
            {"attempt_ratio": attempt.ratio, "attempt_accuracy": attempt.accuracy}, step=i
        )
    tracker.set_tags({f"{v.name}_accepted": v.accepted for v in outcome.variants})
    tracker.log_artifact(paths.PLOTS_DIR / "compression.png", "plots")
    for variant in outcome.variants:
        tracker.log_artifact(variant.path, "onnx")


@cli_entry
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
    print(_report(outcome), file=sys.stderr)


if __name__ == "__main__":
    main()
