"""Shared fixtures: tiny params, a project copy for end-to-end runs, the `gpu` skip."""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
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


# Tiers: `pytest -m "not slow"` runs the pure unit tests (well under a minute on 2 cores);
# `integration` tests train models, run stages or build a project, and are `slow` too. A test is
# integration when it is marked so, lives in one of these folders, or uses one of these fixtures
# (each builds a whole project; fixtures that depend on them count, as pytest resolves them).
INTEGRATION_FOLDERS = ("e2e", "gpu")
PROJECT_FIXTURES = frozenset({"project", "e2e_project"})


def _is_integration(item) -> bool:
    in_folder = any(
        Path(item.path).is_relative_to(REPO_ROOT / "tests" / folder)
        for folder in INTEGRATION_FOLDERS
    )
    return (
        "integration" in item.keywords
        or in_folder
        or not PROJECT_FIXTURES.isdisjoint(getattr(item, "fixturenames", ()))
    )


def pytest_collection_modifyitems(config, items):
    skip_gpu = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if _is_integration(item):
            item.add_marker(pytest.mark.integration)
            item.add_marker(pytest.mark.slow)
        if skip_gpu is not None and "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def tiny_params() -> dict:
    return copy.deepcopy(TINY_PARAMS)


def subprocess_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DVC_ROOT", None)  # the stages' stores follow it (pipeline.paths.store)
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
        "reports",
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
        "mutants",
        "mutants.log",
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


def kill_9_when(proc: subprocess.Popen, pick: Callable, timeout_s: float = 300, poll_s=0.05):
    """SIGKILL `proc` once `pick()` returns something other than None, and return that: what
    `pick` saw is what the killed process left, because `pick` is asked again with the process
    stopped (SIGSTOP) and the kill follows only when it still holds (the process is resumed
    otherwise). Asked once while the process runs, the state could move on before the kill: a
    trial seen running finished in the few milliseconds between (seen in CI). None when the
    process ended or `timeout_s` passed first (it is killed then). `pick` must tolerate a
    store that is being written (return None)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        if pick() is not None:
            os.kill(proc.pid, signal.SIGSTOP)
            seen = pick()
            if seen is not None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return seen
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(poll_s)
    proc.kill()  # past the deadline; a no-op on a process that ended
    proc.wait()
    return None
