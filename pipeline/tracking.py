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
from pipeline.files import git_commit


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
        """Log params; on a resumed run, a changed value (MLflow params are immutable) is
        recorded as the tag `changed.<key>` instead."""
        values = {k: str(v)[:500] for k, v in _flatten(params).items()}
        logged = self._mlflow.get_run(self.run_id).data.params
        changed = {f"changed.{k}": v for k, v in values.items() if k in logged and logged[k] != v}
        new = {k: v for k, v in values.items() if k not in logged}
        if new:
            self._mlflow.log_params(new)
        if changed:
            self.set_tags(changed)

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

    def log_onnx_model(
        self,
        model_proto,
        name: str,
        registered_model: str | None = None,
        providers: list[str] | None = None,
    ) -> str | None:
        """Log an ONNX model (MLflow's onnx flavor, one file) under `name`; when
        `registered_model` is given, register it as a new version and return that version."""
        import mlflow.onnx

        info = mlflow.onnx.log_model(
            model_proto,
            name=name,
            signature=_onnx_signature(model_proto),
            registered_model_name=registered_model,
            onnx_execution_providers=providers,
            save_as_external_data=False,
        )
        return str(info.registered_model_version) if registered_model else None

    def set_model_alias(
        self, registered_model: str, alias: str, version: str, tags: dict | None = None
    ) -> None:
        """Point `alias` (e.g. `champion`) at `version`; `tags` go on that model version."""
        client = self._mlflow.MlflowClient()
        client.set_registered_model_alias(registered_model, alias, version)
        for key, value in (tags or {}).items():
            client.set_model_version_tag(registered_model, version, key, str(value))


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Params,
    dataset_sha256: str = "",
    run_name: str | None = None,
    nested: bool = False,
    resume_run_id: str | None = None,
) -> Iterator[Run | NullRun]:
    """Start an MLflow run for `stage` (nested under the active run when `nested`), or resume
    `resume_run_id` when that run exists in the store (a resumed Optuna study keeps its run)."""
    if not params.tracking.enabled:
        yield NullRun()
        return
    import mlflow

    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri(params))  # (MLflow also exports it to os.environ)
    try:
        with _start(mlflow, stage, params, dataset_sha256, run_name, nested, resume_run_id) as run:
            yield run
    finally:
        # Leave the process as it was: a later stage run with another tracking.uri must not
        # inherit this one through the environment.
        if env_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_uri


@contextlib.contextmanager
def _start(mlflow, stage, params, dataset_sha256, run_name, nested, resume_run_id):
    mlflow.set_experiment(params.tracking.experiment)
    if resume_run_id and not _run_exists(resume_run_id):
        resume_run_id = None
    start = {"run_id": resume_run_id} if resume_run_id else {"run_name": run_name or stage}
    with mlflow.start_run(nested=nested, **start) as run:
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


def _run_exists(run_id: str) -> bool:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.get_run(run_id)
    except MlflowException:
        return False
    return True


class ChildRun:
    """A run nested under `parent_run_id`, written through MlflowClient (process-safe: no
    fluent active-run stack, so worker processes can add trials under one search run)."""

    def __init__(self, params: Params, parent_run_id: str, run_name: str, tags: dict):
        from mlflow.tracking import MlflowClient
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        self._client = MlflowClient(tracking_uri=tracking_uri(params))
        parent = self._client.get_run(parent_run_id)
        all_tags = {MLFLOW_PARENT_RUN_ID: parent_run_id, **{k: str(v) for k, v in tags.items()}}
        run = self._client.create_run(parent.info.experiment_id, tags=all_tags, run_name=run_name)
        self.run_id = run.info.run_id

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        self._client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def log_metrics(self, metrics: dict, step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=batch)

    def finish(self, status: str, tags: dict) -> None:
        """status: FINISHED | FAILED | KILLED (MLflow's run states)."""
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        self._client.set_terminated(self.run_id, status=status)


def end_stale_run(params: Params, run_id: str, tags: dict) -> bool:
    """Mark the run of a trial whose process died as FAILED with `tags`; True if it changed.

    The run may still be RUNNING, or already closed as FINISHED / KILLED when the process died
    between closing its MLflow run and reporting the result to Optuna: Optuna then counts the
    trial as failed (and retries it), so the run must say so too."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(params))
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return False
    if run.info.status == "FAILED" and run.data.tags.get("state") == "FAIL":
        return False
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))
    client.set_terminated(run_id, status="FAILED")
    return True


def _onnx_signature(model_proto):
    """MLflow tensor signature of an ONNX graph's inputs and outputs (symbolic dims -> -1)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec
    from onnx.helper import tensor_dtype_to_np_dtype

    def schema(values) -> Schema:
        specs = []
        for value in values:
            tensor = value.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
            specs.append(TensorSpec(tensor_dtype_to_np_dtype(tensor.elem_type), shape, value.name))
        return Schema(specs)

    graph = model_proto.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    return ModelSignature(inputs=schema(inputs), outputs=schema(graph.output))
