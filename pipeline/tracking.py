"""MLflow tracking shared by every stage: one run per stage execution, trials nested.

The tracking URI is `MLFLOW_TRACKING_URI` when set, else `tracking.uri` from params, else
`sqlite:///mlflow.db` in the project root. Every run is tagged with the git commit, the stage,
the params hash and the dataset sha256. With `tracking.enabled: false` a do-nothing run is
used, so stages never ask "is logging on?".
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from pipeline import paths
from pipeline.config import Params
from pipeline.io import git_commit


def tracking_uri(params: Params) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if params.tracking.uri:
        return params.tracking.uri
    return f"sqlite:///{paths.MLFLOW_DB.resolve()}"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class NullRun:
    """Stands in for an MLflow run when tracking is off: every call does nothing."""

    run_id = None

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class Run:
    """The slice of MLflow a stage uses, bound to one active run."""

    def __init__(self, mlflow_module, run):
        self._mlflow = mlflow_module
        self.run_id = run.info.run_id

    def log_params(self, params: dict) -> None:
        self._mlflow.log_params({k: str(v)[:500] for k, v in _flatten(params).items()})

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        numeric = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        self._mlflow.log_metrics(numeric, step=step)

    def set_tags(self, tags: dict) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifact(str(path), artifact_path=artifact_path)


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Params,
    dataset_sha256: str = "",
    run_name: str | None = None,
    nested: bool = False,
) -> Iterator[Run | NullRun]:
    """Start an MLflow run for `stage` (nested under the active run when `nested`)."""
    if not params.tracking.enabled:
        yield NullRun()
        return
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(params))
    mlflow.set_experiment(params.tracking.experiment)
    with mlflow.start_run(run_name=run_name or stage, nested=nested) as run:
        wrapped = Run(mlflow, run)
        wrapped.set_tags(
            {
                "stage": stage,
                "git_commit": git_commit(),
                "params_hash": params.hash(),
                "dataset_sha256": dataset_sha256,
            }
        )
        yield wrapped
