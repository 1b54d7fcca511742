"""One real `dvc repro` of the whole pipeline on a copy of the project, shared by e2e tests.

Tests that change the copy (params, a second repro) must run last: they are collected from
`test_zz_*.py` files, or restore what they change.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import TINY_PARAMS, copy_project, subprocess_env, write_params


def dvc(project, *args, stdout_only: bool = False):
    """Run `dvc *args` in `project`, which must succeed; its output (stdout and stderr, or
    stdout alone for output to parse, such as `--json`)."""
    proc = subprocess.run(
        ["dvc", *args],
        cwd=project,
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout if stdout_only else proc.stdout + proc.stderr


def stages_run(output: str) -> list[str]:
    """The stages a `dvc repro` ran, in order, from its output's "Running stage 'name':" lines."""
    return re.findall(r"^Running stage '([^']+)':", output, flags=re.MULTILINE)


@pytest.fixture(scope="session")
def e2e_project(tmp_path_factory):
    """(project folder, dvc repro output) after one full `dvc repro` with TINY_PARAMS."""
    project = copy_project(tmp_path_factory.mktemp("e2e") / "project")
    write_params(project, TINY_PARAMS)
    output = dvc(project, "repro")
    return project, output


def copy_built_project(project: Path, dest: Path) -> Path:
    """A copy of the built `project` (git history, DVC cache and lock, every output) for a test
    that runs stages in it, without its MLflow stores: the copy starts an empty `mlflow.db`
    (the original's experiment keeps its artifacts in the original's `mlruns/`)."""
    ignore = shutil.ignore_patterns("mlflow.db", "mlruns", "mlartifacts", "logs", "__pycache__")
    shutil.copytree(project, dest, symlinks=True, ignore=ignore)
    return dest
