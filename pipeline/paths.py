"""Every path the pipeline reads or writes, in one place (dvc.yaml names the same ones).

Paths are relative to the project root, which is the working directory DVC runs stages in.
"""

from __future__ import annotations

from pathlib import Path

PARAMS = Path("params.yaml")
RAW_DIR = Path("data/raw")
PREPARED_DIR = Path("data/prepared")
DATASET_JSON = PREPARED_DIR / "dataset.json"
MODELS_DIR = Path("models")
BASELINE_CKPT = MODELS_DIR / "baseline.pt"
TUNED_CKPT = MODELS_DIR / "tuned.pt"
COMPRESSED_DIR = MODELS_DIR / "compressed"
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")
STUDIES_DIR = Path("studies")
EXPORT_DIR = Path("exported_models")
MLFLOW_DB = Path("mlflow.db")


def split_file(split: str, prepared_dir: Path = PREPARED_DIR) -> Path:
    return prepared_dir / f"{split}.pt"


# compress stage outputs (read by export)
PRUNED_CKPT = COMPRESSED_DIR / "pruned.pt"
DENSE_FP32_ONNX = COMPRESSED_DIR / "dense_fp32.onnx"
PRUNED_FP32_ONNX = COMPRESSED_DIR / "pruned_fp32.onnx"
PRUNED_INT8_ONNX = COMPRESSED_DIR / "pruned_int8.onnx"
PRUNED_FP16_ONNX = COMPRESSED_DIR / "pruned_fp16.onnx"

# export stage outputs
EXPORT_MANIFEST = EXPORT_DIR / "manifest.json"
EXPORT_METRICS = METRICS_DIR / "export.json"
EXPORT_PLOT = PLOTS_DIR / "export_latency.png"


def exported_model(variant: str, export_dir: Path = EXPORT_DIR) -> Path:
    """`exported_models/model_<variant>.onnx` (variants: fp32, pruned_fp32, int8, fp16)."""
    return export_dir / f"model_{variant}.onnx"
