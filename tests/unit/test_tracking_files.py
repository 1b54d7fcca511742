import os

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import parse_params
from pipeline.files import atomic_path, write_json
from pipeline.tracking import stage_run


@pytest.mark.integration  # a real MLflow store
def test_stage_runs_with_other_uris_in_one_process_write_to_their_own_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uris = [f"sqlite:///{tmp_path / name}" for name in ("a.db", "b.db")]
    for uri in uris:
        params = parse_params({"tracking": {"uri": uri, "experiment": "e"}})
        with stage_run("train", params, "sha") as run:
            run.log_params({"x": uri})
    assert "MLFLOW_TRACKING_URI" not in os.environ
    for uri in uris:
        client = MlflowClient(tracking_uri=uri)
        runs = client.search_runs([client.get_experiment_by_name("e").experiment_id])
        assert [r.data.params["x"] for r in runs] == [uri]


@pytest.mark.integration  # a real MLflow store
def test_resumed_run_records_changed_params_as_tags(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = parse_params({"tracking": {"uri": f"sqlite:///{tmp_path / 'm.db'}"}})
    with stage_run("search", params) as run:
        run.log_params({"n_trials": 4, "epochs": 3})
    with stage_run("search", params, resume_run_id=run.run_id) as resumed:
        resumed.log_params({"n_trials": 8, "epochs": 3, "new": 1})
    assert resumed.run_id == run.run_id
    data = MlflowClient(tracking_uri=params.tracking.uri).get_run(run.run_id).data
    assert data.params == {"n_trials": "4", "epochs": "3", "new": "1"}
    assert data.tags["changed.n_trials"] == "8"


def test_atomic_writes_leave_no_temp_file_and_usual_permissions(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    try:
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    except RuntimeError:
        pass
    assert target.read_text().strip() == '{\n  "a": 1\n}'.strip()
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


@pytest.mark.integration  # a real MLflow store
def test_a_new_sqlite_store_is_seeded_from_the_cached_empty_store(tmp_path, monkeypatch):
    """A missing store is a copy of MLflow's empty schema (no migrations per project); MLflow's
    Default experiment is made per project, not copied from the template; stores that exist
    are never replaced."""
    import sqlite3

    import mlflow
    from mlflow.store.db.utils import _get_latest_schema_revision

    from pipeline.tracking import seed_sqlite_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    locations = {}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        params = parse_params({"tracking": {"experiment": "e"}})  # the project's mlflow.db
        with stage_run("train", params, "sha") as run:
            run.log_params({"project": name})
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / name / 'mlflow.db'}")
        locations[name] = client.get_experiment("0").artifact_location
        runs = client.search_runs([client.get_experiment_by_name("e").experiment_id])
        assert [r.data.params["project"] for r in runs] == [name]
    template = tmp_path / "cache" / "tune-compress" / f"mlflow-{mlflow.__version__}-empty.db"
    with sqlite3.connect(template) as db:
        assert db.execute("SELECT count(*) FROM experiments").fetchone() == (0,)
        assert db.execute("SELECT version_num FROM alembic_version").fetchone() == (
            _get_latest_schema_revision(),
        )
    for name, location in locations.items():
        assert location.startswith(str(tmp_path / name)), location
    # an existing store stays as it is
    before = (tmp_path / "a" / "mlflow.db").read_bytes()
    assert seed_sqlite_store(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}") is None
    assert (tmp_path / "a" / "mlflow.db").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["mlflow.db"]


@pytest.mark.integration  # a real MLflow store
def test_without_a_usable_cache_mlflow_creates_the_store_itself(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-folder"))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    params = parse_params({"tracking": {"uri": uri, "experiment": "e"}})
    with stage_run("train", params, "sha") as run:
        run.log_params({"x": 1})
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("e").experiment_id])
    assert [r.data.params["x"] for r in runs] == ["1"]
