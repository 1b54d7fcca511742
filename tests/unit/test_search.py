"""The search stage on the real sqlite Optuna storage and the real MLflow store."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pipeline import search
from pipeline.config import parse_params
from pipeline.data import DeviceData, prepare
from pipeline.study import reconcile_stale_runs, study_name
from pipeline.tracking import ChildRun, stage_run
from tests.conftest import copy_project, run_module, subprocess_env, write_params


def _params(tmp_path, tiny_params, **search_overrides):
    raw = dict(tiny_params)
    raw["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "search"}
    raw["search"] = {"storage": f"sqlite:///{tmp_path / 'optuna.db'}", **search_overrides}
    return parse_params(raw)


@pytest.fixture(scope="module")
def digits_prepared():
    return prepare(parse_params({}).data, seed=0)


def _children(client, parent_run_id):
    runs = client.search_runs(
        [client.get_run(parent_run_id).info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent_run_id}'",
    )
    return {int(r.data.tags["trial_number"]): r for r in runs}


def test_search_prunes_hopeless_trials_and_tracks_every_trial(
    tmp_path, tiny_params, digits_prepared
):
    # lr up to 20 is hopeless for SGD on digits: such trials must be pruned (or fail), not run
    params = _params(
        tmp_path,
        tiny_params,
        n_trials=10,
        epochs=4,
        space={"lr": [1e-4, 20.0], "batch_size": [32, 128]},
    )
    data = DeviceData(digits_prepared, torch.device("cpu"))
    with stage_run("search", params, "sha") as tracker:
        outcome = search.run(params, data, {"test_accuracy": 0.5}, tracker.run_id, progress=False)
    m = outcome.metrics
    assert m["n_complete"] + m["n_pruned"] == 10
    assert m["n_pruned"] >= 1
    assert m["epochs_saved_by_pruning"] > 0
    assert m["epochs_spent"] + m["epochs_saved_by_pruning"] <= m["epochs_without_pruning"]
    assert m["epochs_spent"] == sum(r["epochs_run"] for r in outcome.trials)
    study = outcome.study
    assert m["best_val_accuracy"] == pytest.approx(study.best_value)
    assert outcome.best["params"] == study.best_params
    assert set(outcome.best["params"]) == {"lr", "batch_size", "weight_decay"}
    assert 0.5 < m["tuned_test_accuracy"] <= 1.0
    assert m["baseline_test_accuracy"] == 0.5
    # the retrained model used the full train.epochs budget with the best params
    assert outcome.tuned.fit.epochs_run == params.train.epochs

    client = MlflowClient(tracking_uri=params.tracking.uri)
    children = _children(client, tracker.run_id)
    assert sorted(children) == [t.number for t in study.trials]
    expected_status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
    for t in study.trials:
        run = children[t.number]
        assert run.data.tags["state"] == t.state.name
        assert run.info.status == expected_status[t.state.name]
        assert float(run.data.params["lr"]) == pytest.approx(t.params["lr"])
        assert int(run.data.params["batch_size"]) == t.params["batch_size"]
        assert "weight_decay" in run.data.params
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [h.step for h in history] == list(range(1, t.user_attrs["epochs_run"] + 1))
        assert [h.value for h in history] == pytest.approx(
            [t.intermediate_values[s] for s in range(1, t.user_attrs["epochs_run"] + 1)]
        )
        assert float(run.data.tags["duration_s"]) > 0


def test_unchanged_space_resumes_and_more_trials_runs_only_the_missing(
    tmp_path, tiny_params, digits_prepared
):
    data = DeviceData(digits_prepared, torch.device("cpu"))
    params = _params(tmp_path, tiny_params, n_trials=3, epochs=2, pruner="none")
    first = search.run_study(params, data, "s", None, progress=False)
    first_params = [t.params for t in first.trials]
    assert len(first_params) == 3
    # a new study starts from params.yaml's own values
    train = params.train
    assert first_params[0] == {
        "lr": train.lr,
        "batch_size": train.batch_size,
        "weight_decay": train.weight_decay,
    }
    assert first.trials[0].user_attrs["source"] == "params.yaml"
    more = _params(tmp_path, tiny_params, n_trials=5, epochs=2, pruner="none")
    second = search.run_study(more, data, "s", None, progress=False)
    assert [t.number for t in second.trials] == [0, 1, 2, 3, 4]
    assert [t.params for t in second.trials[:3]] == first_params
    # the derived name changes with the space and stays with n_trials / workers
    sha = data.info["sha256"]["all"]
    assert study_name(params, sha) == study_name(more, sha)
    other = _params(tmp_path, tiny_params, space={"lr": [0.01, 0.1]})
    assert study_name(other, sha) != study_name(params, sha)
    eager = _params(tmp_path, tiny_params, reduction_factor=2)
    assert study_name(eager, sha) != study_name(_params(tmp_path, tiny_params), sha)


def test_run_of_a_worker_killed_after_closing_it_is_marked_failed(tmp_path, tiny_params):
    """kill -9 between closing the trial's MLflow run and telling Optuna: Optuna fails the
    trial (the heartbeat stops) and retries it, so its run must not stay FINISHED/KILLED."""
    params = _params(tmp_path, tiny_params)
    study = optuna.create_study(storage=params.search.storage, study_name="s")
    with stage_run("search", params, "sha") as tracker:
        runs = {}
        for closed_as, reason in [("FINISHED", ""), ("KILLED", ""), ("FAILED", "nan loss")]:
            trial = study.ask()
            run = ChildRun(params, tracker.run_id, f"t{trial.number}", {"trial_number": 0})
            run.finish(closed_as, {"state": {"FINISHED": "COMPLETE"}.get(closed_as, "PRUNED")})
            trial.set_user_attr("mlflow_run_id", run.run_id)
            if reason:  # a failure the objective saw itself keeps its own record
                trial.set_user_attr("fail_reason", reason)
                run.finish("FAILED", {"state": "FAIL", "fail_reason": reason})
            study.tell(trial, state=TrialState.FAIL)  # what the heartbeat check does
            runs[closed_as] = run.run_id
        done = study.ask()
        finished = ChildRun(params, tracker.run_id, "done", {"trial_number": 3})
        finished.finish("FINISHED", {"state": "COMPLETE"})
        done.set_user_attr("mlflow_run_id", finished.run_id)
        study.tell(done, 0.9)
    assert reconcile_stale_runs(params, study) == 2
    assert reconcile_stale_runs(params, study) == 0  # idempotent
    client = MlflowClient(tracking_uri=params.tracking.uri)
    for closed_as, run_id in runs.items():
        run = client.get_run(run_id)
        assert run.info.status == "FAILED"
        assert run.data.tags["state"] == "FAIL"
        expected = "nan loss" if closed_as == "FAILED" else "worker died (no heartbeat)"
        assert run.data.tags["fail_reason"] == expected
    completed = client.get_run(finished.run_id)
    assert completed.info.status == "FINISHED" and completed.data.tags["state"] == "COMPLETE"


def test_diverging_trials_fail_with_reason_and_study_goes_on(
    tmp_path, tiny_params, digits_prepared
):
    data = DeviceData(digits_prepared, torch.device("cpu"))
    data.x["train"][0, 0, 0, 0] = float("nan")  # every epoch's loss is NaN
    params = _params(tmp_path, tiny_params, n_trials=2, epochs=2)
    study = optuna.create_study()  # in-memory: only the objective is under test here
    from pipeline.study import make_objective

    objective = make_objective(params, data, None, search._trial_trainer(params, data))
    study.optimize(objective, n_trials=3, catch=(Exception,))
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 3
    assert all("nan" in t.user_attrs["fail_reason"] for t in study.trials)


def _project(tmp_path, tiny_params, **search_cfg):
    project = copy_project(tmp_path / "project")
    raw = dict(tiny_params, search=search_cfg)
    write_params(project, raw)
    proc = run_module(project, "pipeline.prepare")
    assert proc.returncode == 0, proc.stderr
    return project


@pytest.mark.slow
def test_kill_9_mid_trial_then_rerun_finishes_exactly_n_trials(tmp_path, tiny_params):
    n = 8
    project = _project(tmp_path, tiny_params, n_trials=n, epochs=4, pruner="none")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.search"],
        cwd=project,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    storage = f"sqlite:///{project / 'studies' / 'optuna.db'}"
    deadline = time.time() + 300
    killed_during = None
    while time.time() < deadline and proc.poll() is None:
        try:
            names = optuna.get_all_study_names(storage)
            trials = (
                optuna.load_study(study_name=names[0], storage=storage).trials if names else []
            )
        except Exception:  # the database is being created
            trials = []
        finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        running = [t for t in trials if t.state == TrialState.RUNNING]
        if len(finished) >= 3 and running and running[0].intermediate_values:
            os.kill(proc.pid, signal.SIGKILL)
            killed_during = running[0].number
            break
        time.sleep(0.05)
    proc.wait()
    assert killed_during is not None, "the search ended before it could be killed"
    rerun = run_module(project, "pipeline.search")
    assert rerun.returncode == 0, rerun.stderr
    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    states = [t.state for t in study.trials]
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states) == n
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    assert study.trials[killed_during].state == TrialState.FAIL
    # the killed trial was retried with the same params
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed_during]
    assert len(retries) == 1 and retries[0].params == study.trials[killed_during].params
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("tests").experiment_id], "tags.trial_number != ''"
    )
    numbers = [int(r.data.tags["trial_number"]) for r in runs]
    assert len(numbers) == len(set(numbers)), "a trial number appears twice in MLflow"
    assert all(r.info.status != "RUNNING" for r in runs)
    dead = [r for r in runs if int(r.data.tags["trial_number"]) == killed_during]
    assert dead[0].info.status == "FAILED" and dead[0].data.tags["state"] == "FAIL"
    # all trials of the resumed study hang under one search run
    assert len({r.data.tags["mlflow.parentRunId"] for r in runs}) == 1
    rows = list(csv.DictReader((project / "studies" / "trials.csv").open()))
    assert len(rows) == len(study.trials)
    best = json.loads((project / "studies" / "best_params.json").read_text())
    assert best["trial"] == study.best_trial.number


@pytest.mark.slow
def test_two_workers_share_one_study_without_duplicates(tmp_path, tiny_params):
    n = 12
    project = _project(tmp_path, tiny_params, n_trials=n, epochs=5, pruner="none", workers=2)
    proc = run_module(project, "pipeline.search")
    assert proc.returncode == 0, proc.stderr
    storage = f"sqlite:///{project / 'studies' / 'optuna.db'}"
    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    real = [t for t in study.trials if t.user_attrs.get("fail_reason") != "surplus"]
    assert sum(t.state == TrialState.COMPLETE for t in real) == n
    assert all(t.state == TrialState.COMPLETE for t in real)
    assert {t.user_attrs["worker"] for t in real} == {0, 1}, "both workers ran trials"
    params = [tuple(sorted(t.params.items())) for t in real]
    assert len(set(params)) == n, "two trials ran the same params"
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("tests").experiment_id], "tags.trial_number != ''"
    )
    numbers = sorted(int(r.data.tags["trial_number"]) for r in runs)
    assert numbers == sorted(t.number for t in real)
    metrics = json.loads((project / "metrics" / "search.json").read_text())
    assert metrics["n_complete"] == n and metrics["n_failed"] == 0
