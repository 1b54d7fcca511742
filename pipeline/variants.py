"""The one table of model variants that compress, export, their metrics, the manifest and the
tests import: one name per variant everywhere.

A variant's `name` is its key in `reports/compress.json` and `reports/export.json`
(`int8_val_accuracy`, `pruned_fp32_test_accuracy`, ...), its `name` in the compress stage's
`variants` list and in `exported_models/manifest.json`, the `variant` in its ONNX metadata,
and its exported file, `exported_models/model_<name>.onnx`. `source` is the compress stage's
file (`models/compressed/model_<name>.onnx`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline import paths


@dataclass(frozen=True)
class VariantSpec:
    name: str  # metrics prefix, manifest name, exported as exported_models/model_<name>.onnx
    source: Path  # the compress stage's ONNX file (and its entry in compress.json)
    checkpoint: Path  # the PyTorch model the ONNX model must agree with
    precision: str  # fp32 | int8 | fp16
    label: str  # what it is, for tables and the model card

    @property
    def exported(self) -> Path:
        return paths.exported_model(self.name)


VARIANTS = (
    VariantSpec("fp32", paths.DENSE_FP32_ONNX, paths.TUNED_CKPT, "fp32", "tuned model, fp32"),
    VariantSpec("pruned_fp32", paths.PRUNED_FP32_ONNX, paths.PRUNED_CKPT, "fp32", "pruned, fp32"),
    VariantSpec(
        "int8", paths.PRUNED_INT8_ONNX, paths.PRUNED_CKPT, "int8", "pruned, int8 (static QDQ)"
    ),
    VariantSpec("fp16", paths.PRUNED_FP16_ONNX, paths.PRUNED_CKPT, "fp16", "pruned, fp16"),
)
NAMES = tuple(v.name for v in VARIANTS)
BY_NAME = {v.name: v for v in VARIANTS}
REFERENCE = VARIANTS[0].name  # the dense fp32 model every other variant is compared with
