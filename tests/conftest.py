"""Shared fixtures: tiny params, a project copy for end-to-end runs, the `gpu` skip."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# Small but real: digits, a narrow cnn, few epochs.
TINY_PARAMS = {
    "seed": 0,
    "device": "cpu",
    "data": {"name": "digits", "val_fraction": 0.15, "test_fraction": 0.2},
    "model": {"name": "cnn", "widths": [16, 32]},
    "train": {"epochs": 4, "lr": 0.05, "batch_size": 64},
    "tracking": {"enabled": True, "experiment": "tests"},
    "compress": {"prune_steps": 1, "finetune_epochs": 2, "calibration_images": 64},
    "export": {"warmup_runs": 1, "latency_runs": 5},
    "search": {"n_trials": 6, "epochs": 3, "space": {"lr": [0.001, 0.5]}},
}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_params() -> dict:
    return copy.deepcopy(TINY_PARAMS)


def subprocess_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def copy_project(dest: Path) -> Path:
    """Copy the tracked sources (no .venv, outputs or git history) and `git init` the copy."""
    ignore = shutil.ignore_patterns(
        ".venv",
        ".git",
        "data",
        "models",
        "metrics",
        "plots",
        "mlflow.db",
        "mlruns",
        "mlartifacts",
        "*.egg-info",
        "__pycache__",
        ".pytest_cache",
        ".ruff_cache",
        "dvc.lock",
        ".whl",
        "*.db",
        "*.onnx",
    )
    shutil.copytree(REPO_ROOT, dest, ignore=ignore)
    commit = [
        "git",
        "-c",
        "user.name=test",
        "-c",
        "user.email=test@example.com",
        "commit",
        "-qm",
        "copy",
    ]
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], commit):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


def write_params(project: Path, params: dict) -> None:
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_module(project: Path, module: str, *args: str, env: dict | None = None):
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=project,
        capture_output=True,
        text=True,
        env=subprocess_env(env),
        timeout=900,
    )
