"""The compress stage's ONNX variants: written, then scored with ONNX Runtime on the CPU.

- `export_fp32`, `export_variants`: the dense and pruned fp32 files (`onnx_tools.export_onnx`),
  int8 (`onnx_tools.quantize_int8`, calibrated on `calibration_images`) and fp16
  (`onnx_tools.convert_fp16`), under the names of `pipeline.variants`.
- `measure(name, path, data, size, ...)`: a `Variant` scored on val (accuracy, the paired
  difference to the dense fp32 model, agreement with the fp32 model it came from, size);
  `score_test`: the test accuracy, once, after every decision.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline import onnx_tools
from pipeline.config import Params
from pipeline.data import DeviceData
from pipeline.stats import PairedDifference, paired_difference


@dataclass
class Variant:
    name: str
    path: Path
    val_accuracy: float  # ONNX Runtime on the CPU, val split: what the guard reads
    val_difference: PairedDifference  # vs the dense fp32 model, same images, same runtime
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


def calibration_images(data: DeviceData, count: int, seed: int) -> np.ndarray:
    """`count` training images (seeded random subset) as the models take them: uint8 NHWC."""
    n = len(data.y["train"])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(count, n)]
    return onnx_tools.pixels_nhwc(data.images["train"][order])


def export_fp32(model: nn.Module, path: Path, data: DeviceData, metadata: dict) -> None:
    """fp32 ONNX of `model` taking uint8 pixels, normalised in the graph as `data` is."""
    info = data.info
    onnx_tools.export_onnx(
        model, path, tuple(info["shape"]), metadata, mean=info["mean"], std=info["std"]
    )


def export_variants(
    model: nn.Module, files: dict[str, Path], data: DeviceData, metadata: dict, params: Params
) -> None:
    """Write the pruned model's fp32, int8 (calibrated on training images) and fp16 ONNX."""
    fp32 = files["pruned_fp32"]
    export_fp32(model, fp32, data, metadata | {"variant": "pruned_fp32"})
    calibration = calibration_images(data, params.compress.calibration_images, params.seed)
    onnx_tools.quantize_int8(
        fp32,
        files["int8"],
        calibration,
        params.compress.calibration_method,
        metadata={"variant": "int8"},
    )
    onnx_tools.convert_fp16(fp32, files["fp16"], metadata={"variant": "fp16"})


def onnx_predictions(path: Path, data: DeviceData, split: str) -> tuple[np.ndarray, str]:
    """(top-1 predictions on `split`, provider): ONNX Runtime on the CPU, for every variant,
    fed the split's uint8 pixels (the graph normalises them)."""
    session, provider = onnx_tools.make_session(path, "cpu")
    pixels = onnx_tools.pixels_nhwc(data.images[split])
    return onnx_tools.run_logits(session, pixels).argmax(1), provider


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
