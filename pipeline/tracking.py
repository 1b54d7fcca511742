"""MLflow tracking shared by every stage: one run per stage execution, trials nested.

The tracking URI is `MLFLOW_TRACKING_URI` when set, else `tracking.uri` from params, else
`sqlite:///mlflow.db` in the project root. Every run is tagged with the git commit, the stage,
the params hash, the dataset sha256 and its process (`process.pid`, `process.host`). With
`tracking.enabled: false` a do-nothing run is used, so stages never ask "is logging on?".

Before a stage run starts, a tracking server (http, https, a database host) is probed for a few
seconds (a UserError naming the URI instead of minutes of silent retries), and the RUNNING runs
of the same stage whose process died on this host (kill -9) are ended as FAILED.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from pipeline import paths
from pipeline.config import Params, check_tracking_uri
from pipeline.errors import UserError
from pipeline.files import git_commit


def tracking_uri(params: Params) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if params.tracking.uri:
        return params.tracking.uri
    return f"sqlite:///{paths.store(paths.MLFLOW_DB)}"  # the project's, also from a DVC copy


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

    def log_onnx_model(self, model_proto, name: str, providers: list[str] | None = None) -> str:
        """Log an ONNX model (MLflow's onnx flavor, one file) under `name`; its model URI."""
        import mlflow.onnx

        info = mlflow.onnx.log_model(
            model_proto,
            name=name,
            signature=_onnx_signature(model_proto),
            onnx_execution_providers=providers,
            save_as_external_data=False,
            pip_requirements=onnx_requirements(),
        )
        return info.model_uri

    # ---- the model registry: a version is known by its file's sha256 (a version tag)

    def aliased_version(self, registered_model: str, alias: str) -> dict | None:
        """{"version": ..., **tags} of the version `alias` points at; None when there is none."""
        from mlflow.exceptions import MlflowException

        client = self._mlflow.MlflowClient()
        try:
            version = client.get_model_version_by_alias(registered_model, alias)
        except MlflowException:  # no such registered model, or no such alias
            return None
        return {"version": str(version.version), **version.tags}

    def register_file(self, model_uri: str, registered_model: str, sha256: str) -> str:
        """The version whose `sha256` tag is `sha256` when there is one, else a new version of
        `model_uri` tagged with it: a file is registered once, whatever the number of runs."""
        from mlflow.exceptions import MlflowException

        client = self._mlflow.MlflowClient()
        try:
            versions = client.search_model_versions(f"name = '{registered_model}'")
        except MlflowException:
            versions = []
        same = sorted(int(v.version) for v in versions if v.tags.get("sha256") == sha256)
        if same:
            return str(same[0])
        new = self._mlflow.register_model(model_uri, registered_model, tags={"sha256": sha256})
        return str(new.version)

    def describe_version(
        self, registered_model: str, version: str, tags: dict, description: str
    ) -> None:
        """Set `tags` and the `description` (the model card) of one model version."""
        client = self._mlflow.MlflowClient()
        for key, value in tags.items():
            client.set_model_version_tag(registered_model, version, key, str(value))
        client.update_model_version(registered_model, version, description=description)

    def set_model_alias(self, registered_model: str, alias: str, version: str) -> None:
        """Point `alias` (e.g. `champion`) at `version`."""
        self._mlflow.MlflowClient().set_registered_model_alias(registered_model, alias, version)


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
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    check_tracking(params)
    import mlflow

    uri = tracking_uri(params)
    seed_sqlite_store(uri)
    mlflow.set_tracking_uri(uri)  # (MLflow also exports it to os.environ)
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


def seed_sqlite_store(uri: str) -> Path | None:
    """Create a missing local SQLite tracking store as a copy of an empty one of this MLflow
    version (cached per user), instead of letting MLflow create it: creating one runs all of
    MLflow's schema migrations, about 1 s on every fresh project, DVC experiment and test.

    The template has MLflow's tables at its schema head and no experiment: MLflow adds its
    `Default` experiment when it opens the copy, with an artifact location of this project.
    An existing store is never touched (the copy is linked in under the store's name, which
    fails if another process created it first). Returns the path created, or None (store
    present, not a local SQLite file, or no template to be had, e.g. the cache not writable:
    MLflow then creates the store itself)."""
    if not uri.startswith("sqlite:///") or "?" in uri:
        return None
    target = Path(uri.removeprefix("sqlite:///"))
    if target.exists() or str(target) in ("", ":memory:"):
        return None
    try:
        template = _empty_store_template()
        target.parent.mkdir(parents=True, exist_ok=True)
        copy = target.with_name(f".{target.name}.{os.getpid()}.seed")
        shutil.copyfile(template, copy)
        try:
            os.link(copy, target)
        except FileExistsError:  # another stage or worker created it meanwhile: theirs stays
            return None
        finally:
            copy.unlink()
    except Exception:  # an optimisation only: on any failure MLflow creates the store itself
        return None
    return target


def _empty_store_template() -> Path:
    """The cached empty store of this MLflow version, built by MLflow itself on first use."""
    import sqlite3
    import tempfile

    import mlflow

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tune-compress"
    template = cache / f"mlflow-{mlflow.__version__}-empty.db"
    if template.exists():
        return template
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        built = Path(tmp) / "empty.db"
        SqlAlchemyStore(f"sqlite:///{built}", Path(tmp).as_uri()).engine.dispose()
        with contextlib.closing(sqlite3.connect(built)) as db, db:
            db.execute("DELETE FROM experiments")  # MLflow's Default, with this tmp's location
        os.replace(built, template)
    return template


def onnx_requirements() -> list[str]:
    """The pinned requirements of a logged ONNX model: MLflow's onnx flavor defaults (onnx,
    onnxruntime), numpy, and onnxruntime-gpu where installed: what MLflow's own inference
    finds, without the subprocess it starts per model to find it (about 2 s each)."""
    from importlib.metadata import PackageNotFoundError, version

    import mlflow.onnx

    found = list(mlflow.onnx.get_default_pip_requirements())
    for dist in ("numpy", "onnxruntime-gpu"):
        try:
            found.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            pass
    return sorted(found)


def check_tracking(params: Params) -> None:
    """`check_tracking_server` on the URI a stage run would use (nothing when tracking is off):
    for stages that write before they start their run (prepare, search), so an unreachable
    server stops them before any work."""
    if params.tracking.enabled:
        env_uri = os.environ.get("MLFLOW_TRACKING_URI")
        check_tracking_server(
            tracking_uri(params), "MLFLOW_TRACKING_URI" if env_uri else "tracking.uri"
        )


def check_tracking_server(uri: str, key: str, timeout_s: float = 5.0) -> None:
    """Raise UserError naming `key` when `uri` is not a tracking URI MLflow can open, or names a
    server (http, https, a database host) that accepts no connection within `timeout_s`.

    Without this probe MLflow retries an unreachable server for minutes, printing nothing."""
    import socket
    from urllib.parse import urlsplit

    check_tracking_uri(uri, key)
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+")[0]
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return
    try:
        if scheme in ("http", "https"):  # any HTTP answer will do, even an error status
            _http_answers(uri.rstrip("/") + "/health", timeout_s)
        else:
            port = parts.port or _DEFAULT_PORTS[scheme]
            socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except (OSError, ValueError) as err:
        reason = " ".join(str(getattr(err, "reason", err)).split()) or type(err).__name__
        raise UserError(
            f"{key}: got {uri!r}; no tracking server answers there ({reason}); start it, fix "
            f"the URI, or set tracking.enabled: false"
        ) from None


_DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}


def _http_answers(url: str, timeout_s: float) -> None:
    """Return when the server at `url` sends any HTTP response; raise OSError otherwise."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(url, timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return


@contextlib.contextmanager
def _start(mlflow, stage, params, dataset_sha256, run_name, nested, resume_run_id):
    experiment = _open_experiment(mlflow, params.tracking.experiment)
    end_dead_stage_runs(mlflow.MlflowClient(), experiment.experiment_id, stage, resume_run_id)
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
                **_process_tags(),
            }
        )
        yield wrapped


def _open_experiment(mlflow, name: str):
    """`mlflow.set_experiment(name)`; a store that refuses it (a server answering errors, a
    deleted experiment of that name) is a UserError naming the URI."""
    from mlflow.exceptions import MlflowException

    try:
        _create_experiment(mlflow, name)
        return mlflow.set_experiment(name)
    except MlflowException as err:
        reason = " ".join(str(err).split())[:200]
        raise UserError(
            f"tracking.experiment: {name!r} cannot be opened at {mlflow.get_tracking_uri()!r} "
            f"({reason})"
        ) from None


# MLflow 3's UI opens an experiment in its model-training view (runs, metrics, models), not the
# GenAI view (traces), when this experiment tag says so; the UI's own switch sets the same tag.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def _create_experiment(mlflow, name: str) -> None:
    """Create experiment `name` when missing, tagged as a model-training experiment; with a
    local SQLite store its artifacts go to the project's `mlruns/` (not the working directory,
    which is a temporary copy in a queued or `--temp` DVC experiment). An existing experiment
    without the kind tag gets it."""
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        missing = EXPERIMENT_KIND.items() - experiment.tags.items()
        if experiment.lifecycle_stage == "active" and missing:
            for key, value in missing:
                client.set_experiment_tag(experiment.experiment_id, key, value)
        return
    artifacts = None
    if mlflow.get_tracking_uri().startswith("sqlite:"):
        slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
        artifacts = (paths.store(paths.MLFLOW_ARTIFACTS) / slug).as_uri()
    try:
        client.create_experiment(name, artifact_location=artifacts, tags=EXPERIMENT_KIND)
    except MlflowException:  # created meanwhile by another process (a search worker)
        if client.get_experiment_by_name(name) is None:
            raise


def _run_exists(run_id: str) -> bool:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.get_run(run_id)
    except MlflowException:
        return False
    return True


# Tags naming the process that owns a stage run, so the next run can tell a dead one (kill -9)
PID_TAG, HOST_TAG = "process.pid", "process.host"


def _process_tags() -> dict:
    import socket

    return {PID_TAG: os.getpid(), HOST_TAG: socket.gethostname()}


def _process_alive(pid: int) -> bool:
    """True when `pid` runs on this machine (a zombie, killed but not yet reaped, is dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def end_dead_stage_runs(client, experiment_id: str, stage: str, keep: str | None = None) -> list:
    """End as FAILED the RUNNING runs of `stage` whose process died on this machine (a stage
    killed with kill -9 cannot end its own run); returns their run ids. A run from another host,
    of a live process, without process tags (older runs) or `keep` (a run being resumed) is
    left alone."""
    import socket

    host = socket.gethostname()
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.stage = '{stage}' and attributes.status = 'RUNNING'",
    )
    ended = []
    for run in runs:
        tags = run.data.tags
        pid = tags.get(PID_TAG, "")
        if run.info.run_id == keep or tags.get(HOST_TAG) != host or not pid.isdigit():
            continue
        if _process_alive(int(pid)):
            continue
        client.set_tag(
            run.info.run_id,
            "failure",
            f"process {pid} on {host} ended without closing this run (killed?); "
            f"found by the next {stage} run",
        )
        client.set_terminated(run.info.run_id, status="FAILED")
        ended.append(run.info.run_id)
    return ended


class ChildRun:
    """A run nested under `parent_run_id`, written through MlflowClient (process-safe: no
    fluent active-run stack, so worker processes can add trials under one search run)."""

    # metrics are written together, at most this often and when the run finishes (one write
    # per epoch cost about as much as a short epoch's training)
    FLUSH_S = 5.0
    _experiments: dict = {}  # (tracking URI, parent run id) -> the parent's experiment id

    def __init__(self, params: Params, parent_run_id: str, run_name: str, tags: dict):
        import time

        from mlflow.tracking import MlflowClient
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        self._pending: list = []  # metrics not written yet
        self._flushed = time.monotonic()
        uri = tracking_uri(params)
        self._client = MlflowClient(tracking_uri=uri)
        key = (uri, parent_run_id)
        if key not in ChildRun._experiments:  # the parent's experiment: read once per process
            ChildRun._experiments[key] = self._client.get_run(parent_run_id).info.experiment_id
        all_tags = {MLFLOW_PARENT_RUN_ID: parent_run_id, **{k: str(v) for k, v in tags.items()}}
        run = self._client.create_run(ChildRun._experiments[key], tags=all_tags, run_name=run_name)
        self.run_id = run.info.run_id

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        self._client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Queue `metrics` at `step` (timestamped now); written with the queued ones when
        `FLUSH_S` has passed since the last write, and by `flush` / `finish`."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if time.monotonic() - self._flushed >= self.FLUSH_S:
            self.flush()

    def flush(self, tags: tuple = ()) -> None:
        """Write the queued metrics, 1000 per write (MLflow's batch limit), with `tags` (MLflow
        RunTags) in the last write."""
        import time

        pending, self._pending = self._pending, []
        batches = [pending[i : i + 1000] for i in range(0, len(pending), 1000)] or [[]]
        for batch in batches[:-1]:
            self._client.log_batch(self.run_id, metrics=batch)
        if batches[-1] or tags:
            self._client.log_batch(self.run_id, metrics=batches[-1], tags=list(tags))
        self._flushed = time.monotonic()

    def finish(self, status: str, tags: dict) -> None:
        """status: FINISHED | FAILED | KILLED (MLflow's run states); queued metrics and `tags`
        in one write, then the status."""
        from mlflow.entities import RunTag

        self.flush(tuple(RunTag(k, str(v)) for k, v in tags.items()))
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
