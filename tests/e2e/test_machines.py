"""Several machines on one study: real PostgreSQL, a real `mlflow server`, separate copies.

Each "machine" is its own copy of the project (its own folder and processes); they share
nothing but the study's PostgreSQL URL (`search.storage`) and the tracking server's URI
(`MLFLOW_TRACKING_URI`). Machine 1 runs the pipeline up to the search stage (`dvc repro
search`; `python -m pipeline.search` in the kill test), the others `python -m
pipeline.search_worker`. Skipped, with the reason,
where PostgreSQL is not installed.
"""

import copy
import os
import signal
import subprocess
import sys
import threading

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pipeline.study import is_skipped, open_storage
from tests.conftest import (
    TINY_PARAMS,
    copy_project,
    kill_9_when,
    run_module,
    subprocess_env,
    write_params,
)
from tests.servers import mlflow_server, postgres_cluster, postgres_missing

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    """(PostgreSQL cluster, tracking server URI, the server's --artifacts-destination)."""
    reason = postgres_missing()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("servers")
    with postgres_cluster() as pg:
        artifacts = folder / "artifacts"
        with mlflow_server(pg.url("mlflow"), artifacts, folder / "mlflow.log") as uri:
            yield pg, uri, artifacts


def _machines(tmp_path, count: int, storage: str, experiment: str, **search) -> list:
    """`count` copies of the project with one params.yaml; machine 1 holds data/prepared."""
    params = copy.deepcopy(TINY_PARAMS)
    params["tracking"] = {"enabled": True, "experiment": experiment}
    params["search"] = {"storage": storage, "pruner": "none", "workers": 1, **search}
    machines = []
    for i in range(1, count + 1):
        machine = copy_project(tmp_path / f"machine{i}")
        write_params(machine, params)
        machines.append(machine)
    return machines


def _machine_id(machine) -> str:
    """`pipeline.study.machine_id()` of a copy of the project on this host."""
    return f"{os.uname().nodename}:{machine.resolve()}"


def _worker(machine, uri: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.search_worker", "--wait-s", "240"],
        cwd=machine,
        env=subprocess_env({"MLFLOW_TRACKING_URI": uri}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _prepare(machine, uri: str) -> None:
    proc = run_module(machine, "pipeline.prepare", env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr


def _study(storage: str) -> optuna.Study:
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


def _trial_runs(client: MlflowClient, experiment: str) -> list:
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([experiment_id], "tags.trial_number != ''", max_results=1000)


def test_machines_opening_one_new_database_together_all_open_it(servers):
    """Optuna creates its tables on first open; PostgreSQL fails all but one of the processes
    doing that at the same moment (a unique violation), so `open_storage` retries."""
    pg, _, _ = servers
    url = pg.url("opened_together")
    barrier, errors = threading.Barrier(4), []

    def open_at_once():
        barrier.wait()
        try:
            open_storage(url)
        except Exception as err:  # what a machine would die of
            errors.append(type(err).__name__)

    threads = [threading.Thread(target=open_at_once) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert optuna.get_all_study_names(url) == []  # the tables exist, no study yet


def test_three_machines_share_one_study_and_one_search_run(servers, tmp_path):
    pg, uri, artifacts = servers
    n = 9
    storage = pg.url("three_machines")
    machines = _machines(tmp_path, 3, storage, "machines", n_trials=n, epochs=2)
    workers = [_worker(m, uri) for m in machines[1:]]  # they wait for the stage's study
    # the first machine runs the pipeline as a user does: prepare, train, search
    stage = subprocess.run(
        ["dvc", "repro", "search"],
        cwd=machines[0],
        env=subprocess_env({"MLFLOW_TRACKING_URI": uri}),
        capture_output=True,
        text=True,
        timeout=600,
    )
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert stage.returncode == 0, stage.stdout + stage.stderr
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output
        assert "finished trial(s) ran on this machine" in output

    study = _study(storage)
    trials = study.get_trials(deepcopy=False)
    assert sum(t.state in FINISHED for t in trials) == n
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    real = [t for t in trials if not is_skipped(t.user_attrs.get("fail_reason", ""))]
    assert len(real) == n and all(t.state == TrialState.COMPLETE for t in real)
    assert len({tuple(sorted(t.params.items())) for t in real}) == n, "a param set ran twice"
    from_params_yaml = [t for t in real if t.user_attrs.get("source") == "params.yaml"]
    assert len(from_params_yaml) == 1
    # every trial names the machine that ran it: its copy of the project on this host
    by_machine = {}
    for t in sorted(real, key=lambda t: t.number):
        by_machine.setdefault(t.user_attrs.get("machine"), []).append(t)
    assert set(by_machine) == {_machine_id(m) for m in machines}, "every machine ran trials"
    first_draws = [
        next(t.params for t in ts if t.user_attrs.get("source") != "params.yaml")
        for ts in by_machine.values()
    ]
    assert len({tuple(sorted(p.items())) for p in first_draws}) == 3, first_draws

    client = MlflowClient(uri)
    runs = _trial_runs(client, "machines")
    numbers = sorted(int(r.data.tags["trial_number"]) for r in runs)
    assert numbers == sorted(t.number for t in real), "one MLflow run per trial, none twice"
    (parent_id,) = {r.data.tags["mlflow.parentRunId"] for r in runs}
    parent = client.get_run(parent_id)
    assert parent.data.tags["stage"] == "search" and parent.info.status == "FINISHED"
    assert study.user_attrs["mlflow_parent_run_id"] == parent_id
    assert all(r.info.status == "FINISHED" for r in runs)
    # the search run's files went through the server: they lie in its artifact store
    logged = {a.path for a in client.list_artifacts(parent_id, "search")}
    assert "search/trials.csv" in logged
    stored = list(artifacts.rglob(f"{parent_id}/artifacts/search/trials.csv"))
    assert len(stored) == 1 and stored[0].read_bytes().startswith(b"number,state")
    for machine in machines:
        assert not [p for p in ("mlruns", "mlartifacts", "mlflow.db") if (machine / p).exists()]
    assert not (machines[1] / "data" / "prepared").exists()  # workers write no file
    # DVC's `studies/optuna.db` output: a snapshot of the PostgreSQL study as the stage left it
    snapshot = optuna.load_study(
        study_name=study.study_name, storage=f"sqlite:///{machines[0] / 'studies' / 'optuna.db'}"
    )
    assert [(t.number, t.state, t.value) for t in snapshot.trials] == [
        (t.number, t.state, t.value) for t in study.trials
    ]
    status = subprocess.run(
        ["dvc", "status", "search"],
        cwd=machines[0],
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert "Data and pipelines are up to date" in status.stdout, status.stdout


def test_a_machine_killed_mid_trial_is_retried_by_another_and_its_run_fails(servers, tmp_path):
    pg, uri, _ = servers
    n = 6
    storage = pg.url("killed_machine")
    first, second = _machines(tmp_path, 2, storage, "killed", n_trials=n, epochs=4)
    _prepare(first, uri)
    worker = _worker(second, uri)
    stage = subprocess.Popen(
        [sys.executable, "-m", "pipeline.search"],
        cwd=first,
        env=subprocess_env({"MLFLOW_TRACKING_URI": uri}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    study, rdb = None, None

    def mid_trial_on_second():  # a trial of the second machine between two of its epochs
        nonlocal study, rdb
        try:  # one storage for every poll: a new one per poll held a connection each, and
            # PostgreSQL ran out of connection slots
            study = study or _study(rdb := rdb or open_storage(storage))
            trials = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        except (ValueError, KeyError):  # no study yet
            return None
        on_second = [
            t.number
            for t in trials
            if t.user_attrs.get("machine") == _machine_id(second)
            and len(t.intermediate_values) in range(1, 4)
        ]
        return on_second[0] if on_second else None

    killed = kill_9_when(worker, mid_trial_on_second, timeout_s=240, poll_s=0.1)
    worker.wait(timeout=30)
    _, stage_err = stage.communicate(timeout=400)
    assert killed is not None, "the worker never ran a trial it could be killed in"
    assert stage.returncode == 0, stage_err

    study = _study(storage)
    trials = study.get_trials(deepcopy=False)
    assert sum(t.state in FINISHED for t in trials) == n
    assert trials[killed].state == TrialState.FAIL
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert retry.state == TrialState.COMPLETE and retry.params == trials[killed].params
    assert worker.returncode == -signal.SIGKILL  # so another machine (the first) re-ran it
    client = MlflowClient(uri)
    runs = {int(r.data.tags["trial_number"]): r for r in _trial_runs(client, "killed")}
    assert runs[killed].info.status == "FAILED"
    assert runs[killed].data.tags["state"] == "FAIL"
    assert runs[retry.number].info.status == "FINISHED"
    assert runs[retry.number].data.tags["retry_of_trial"] == str(killed)
    assert len({r.data.tags["mlflow.parentRunId"] for r in runs.values()}) == 1
