"""Every path the pipeline reads or writes, in one place (dvc.yaml names the same ones).

Paths are relative to the project root, which is the working directory DVC runs stages in.
The project's stores (`mlflow.db`, `mlruns/`, the Optuna study in `studies/`) are the exception:
`store()` resolves them in the project's own folder, also when DVC runs a queued or `--temp`
experiment in a copy of the project (`.dvc/tmp/exps/...`), whose records would otherwise be lost
with the copy.
"""

from __future__ import annotations

import os
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
MLFLOW_ARTIFACTS = Path("mlruns")
REPORTS_DIR = Path("reports")


def project_root() -> Path:
    """The project's own folder: `DVC_ROOT` when DVC runs the stage (DVC points it at the
    project, also for a queued or `--temp` experiment run in a temporary copy), else the
    working directory."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def store(path: str | Path) -> Path:
    """`path` (relative to the project root) in the project's own folder, absolute."""
    return project_root() / path


def storage_url(url: str) -> str:
    """An Optuna / SQLAlchemy URL with a relative SQLite file (`sqlite:///studies/optuna.db`)
    made absolute in the project's own folder; any other URL unchanged."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/"):
        file = url.removeprefix(prefix)
        if file and file != ":memory:":
            return prefix + str(store(file))
    return url


def metrics_file(stage: str) -> Path:
    """`metrics/<stage>.json`: the numbers worth comparing across experiments (DVC metrics)."""
    return METRICS_DIR / f"{stage}.json"


def report_file(stage: str) -> Path:
    """`reports/<stage>.json`: the stage's whole record (strings, flags, seconds, machine)."""
    return REPORTS_DIR / f"{stage}.json"


def split_file(split: str, prepared_dir: Path = PREPARED_DIR) -> Path:
    return prepared_dir / f"{split}.pt"


# compress stage outputs (read by export)
PRUNED_CKPT = COMPRESSED_DIR / "pruned.pt"
# the compress stage's ONNX files, named like the exported ones (`pipeline.variants`)
DENSE_FP32_ONNX = COMPRESSED_DIR / "model_fp32.onnx"
PRUNED_FP32_ONNX = COMPRESSED_DIR / "model_pruned_fp32.onnx"
PRUNED_INT8_ONNX = COMPRESSED_DIR / "model_int8.onnx"
PRUNED_FP16_ONNX = COMPRESSED_DIR / "model_fp16.onnx"

# export stage outputs
EXPORT_MANIFEST = EXPORT_DIR / "manifest.json"
MODEL_CARD = EXPORT_DIR / "MODEL_CARD.md"
EXPORT_METRICS = METRICS_DIR / "export.json"
EXPORT_PLOT = PLOTS_DIR / "export_latency.png"


def exported_model(variant: str, export_dir: Path = EXPORT_DIR) -> Path:
    """`exported_models/model_<variant>.onnx` (variants: fp32, pruned_fp32, int8, fp16)."""
    return export_dir / f"model_{variant}.onnx"
