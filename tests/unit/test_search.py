"""The search stage on the real sqlite Optuna storage and the real MLflow store."""

import csv
import json
import os
import subprocess
import sys
import time

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pipeline import search, search_study, study
from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.config import parse_params
from pipeline.data import DeviceData, prepare
from pipeline.engine import evaluate
from pipeline.errors import StageFailed
from pipeline.reporting import search_summary
from pipeline.study import reconcile_stale_runs, study_name
from pipeline.tracking import ChildRun, stage_run
from pipeline.train import train_and_evaluate
from tests.conftest import copy_project, kill_9_when, run_module, subprocess_env, write_params


def _params(tmp_path, tiny_params, **search_overrides):
    raw = dict(tiny_params)
    raw["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "search"}
    raw["search"] = {"storage": f"sqlite:///{tmp_path / 'optuna.db'}", **search_overrides}
    return parse_params(raw)


@pytest.fixture(scope="module")
def digits_prepared():
    return prepare(parse_params({}).data, seed=0)


@pytest.fixture(scope="module")
def baseline_ckpt(digits_prepared, tmp_path_factory):
    """The train stage's output for TINY_PARAMS (4 epochs at lr 0.05): a strong baseline."""
    from tests.conftest import TINY_PARAMS

    params = parse_params(TINY_PARAMS)
    data = DeviceData(digits_prepared, torch.device("cpu"))
    outcome = train_and_evaluate(params, data)
    assert outcome.metrics["val_accuracy"] > 0.9
    path = tmp_path_factory.mktemp("baseline") / "baseline.pt"
    save_checkpoint(path, outcome.model, outcome.arch, params, data.info, outcome.metrics)
    return path


def _children(client, parent_run_id):
    runs = client.search_runs(
        [client.get_run(parent_run_id).info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent_run_id}'",
    )
    return {int(r.data.tags["trial_number"]): r for r in runs}


@pytest.mark.integration
@pytest.mark.parametrize("threads_before", [None, 1], ids=["default-threads", "one-thread"])
def test_search_prunes_hopeless_trials_and_tracks_every_trial(
    tmp_path, tiny_params, digits_prepared, baseline_ckpt, threads_before
):
    # threads_before=1: the process had another thread count than the trials get (a leak of an
    # earlier test did that in CI); the retrain must still run with the trials' count
    threads = torch.get_num_threads()
    if threads_before is not None:
        torch.set_num_threads(threads_before)
    try:
        _search_prunes_hopeless_trials(tmp_path, tiny_params, digits_prepared, baseline_ckpt)
    finally:
        torch.set_num_threads(threads)


def _search_prunes_hopeless_trials(tmp_path, tiny_params, digits_prepared, baseline_ckpt):
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
        outcome = search.run(params, data, baseline_ckpt, tracker.run_id, progress=False)
    m = outcome.metrics
    assert m["n_complete"] + m["n_pruned"] == 10
    assert m["n_pruned"] >= 1
    assert m["epochs_saved_by_pruning"] > 0
    assert m["epochs_spent"] + m["epochs_saved_by_pruning"] <= m["epochs_without_pruning"]
    assert m["epochs_spent"] == sum(r["epochs_run"] for r in outcome.trials)
    study = outcome.study
    assert m["best_trial_val_accuracy"] == pytest.approx(study.best_value)
    assert outcome.best["params"] == study.best_params
    assert set(outcome.best["params"]) == {"lr", "batch_size", "weight_decay"}
    # the objective is the last epoch's val accuracy (the weights a trial would ship)
    for t in study.trials:
        if t.state == TrialState.COMPLETE:
            assert t.value == t.intermediate_values[max(t.intermediate_values)]
    # this process trained the winning trial: its own model is shipped, not retrained
    n_val = len(data.y["val"])
    assert m["winner_retrained"] is False and m["retrain_seconds"] is None
    assert m["winner_val_accuracy"] == pytest.approx(m["best_trial_val_accuracy"], abs=1e-6)
    if m["tuned_source"] == "search":  # the shipped weights score the trial's val accuracy
        _, val_accuracy = evaluate(outcome.tuned.model, data.x["val"], data.y["val"], False)
        assert val_accuracy == pytest.approx(study.best_value, abs=1e-6)
    baseline_blob = torch.load(baseline_ckpt, weights_only=True)
    assert m["baseline_val_accuracy"] == baseline_blob["metrics"]["val_accuracy"]
    assert m["baseline_test_accuracy"] == baseline_blob["metrics"]["test_accuracy"]
    assert m["search_minus_baseline_val_n_images"] == n_val
    low, high = m["search_minus_baseline_val_low"], m["search_minus_baseline_val_high"]
    assert low <= m["search_minus_baseline_val_difference"] <= high
    # shipped: the winner unless the baseline is better beyond the noise
    assert m["tuned_source"] == ("baseline" if high < 0 else "search")
    if m["tuned_source"] == "search":
        assert m["tuned_val_accuracy"] == m["winner_val_accuracy"]
        assert outcome.tuned.params.train.epochs == params.search.epochs
        assert outcome.tuned.params.train.lr == study.best_params["lr"]

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
        # sorting by `objective` in the MLflow UI ranks trials exactly as Optuna does
        if t.state == TrialState.COMPLETE:
            assert run.data.metrics["objective"] == pytest.approx(t.value)
        else:
            assert "objective" not in run.data.metrics

    # a re-run resumes the finished study and trains no trial: the winner is retrained exactly
    # as its trial was scored, so it reproduces its score
    again = search.run(params, data, baseline_ckpt, None, progress=False).metrics
    assert again["winner_retrained"] is True and again["retrain_processes"] == 1
    assert again["best_trial"] == m["best_trial"]
    assert abs(again["winner_val_accuracy"] - m["best_trial_val_accuracy"]) <= 2 / n_val


@pytest.mark.integration
def test_unchanged_space_resumes_and_more_trials_runs_only_the_missing(
    tmp_path, tiny_params, digits_prepared
):
    data = DeviceData(digits_prepared, torch.device("cpu"))
    params = _params(tmp_path, tiny_params, n_trials=3, epochs=2, pruner="none")
    first = search_study.run_study(params, data, "s", None, progress=False)
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
    second = search_study.run_study(more, data, "s", None, progress=False)
    assert [t.number for t in second.trials] == [0, 1, 2, 3, 4]
    assert [t.params for t in second.trials[:3]] == first_params
    # the derived name changes with the space and stays with n_trials / workers
    sha = data.info["sha256"]["all"]
    assert study_name(params, sha) == study_name(more, sha)
    other = _params(tmp_path, tiny_params, space={"lr": [0.01, 0.1]})
    assert study_name(other, sha) != study_name(params, sha)
    eager = _params(tmp_path, tiny_params, reduction_factor=3)
    assert study_name(eager, sha) != study_name(_params(tmp_path, tiny_params), sha)


@pytest.mark.integration  # a real MLflow store: its migrations take seconds
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


@pytest.mark.integration
def test_diverging_trials_fail_with_reason_and_study_goes_on(
    tmp_path, tiny_params, digits_prepared
):
    data = DeviceData(digits_prepared, torch.device("cpu"))
    data.x["train"][0, 0, 0, 0] = float("nan")  # every epoch's loss is NaN
    params = _params(tmp_path, tiny_params, n_trials=2, epochs=2)
    study = optuna.create_study()  # in-memory: only the objective is under test here
    from pipeline.study import make_objective

    objective = make_objective(params, data, None, search_study.TrialTrainer(params, data))
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


@pytest.mark.integration
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

    def mid_trial():  # a running trial with an epoch reported, after 3 finished ones
        try:
            names = optuna.get_all_study_names(storage)
            trials = (
                optuna.load_study(study_name=names[0], storage=storage).trials if names else []
            )
        except Exception:  # the database is being created or written
            return None
        finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        running = [t for t in trials if t.state == TrialState.RUNNING and t.intermediate_values]
        return running[0].number if len(finished) >= 3 and running else None

    killed_during = kill_9_when(proc, mid_trial)
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


@pytest.mark.integration
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
    metrics = json.loads((project / "reports" / "search.json").read_text())
    assert metrics["n_complete"] == n and metrics["n_failed"] == 0


# --- the search's decisions ----------------------------------------------------------------


@pytest.mark.integration
def test_a_worse_search_keeps_the_baseline_and_says_so(
    tmp_path, tiny_params, digits_prepared, baseline_ckpt
):
    # a space of tiny learning rates and 2 epochs learns something, but far less than the
    # baseline (4 epochs at lr 0.05): the stage must ship the baseline, not the winner
    params = _params(
        tmp_path,
        tiny_params,
        n_trials=3,
        epochs=2,
        pruner="none",
        space={"lr": [0.006, 0.01], "batch_size": [128]},
    )
    data = DeviceData(digits_prepared, torch.device("cpu"))
    outcome = search.run(params, data, baseline_ckpt, None, progress=False)
    m = outcome.metrics
    assert m["search_minus_baseline_val_high"] < 0
    assert m["tuned_source"] == "baseline" and outcome.tuned.source == "baseline"
    assert m["tuned_val_accuracy"] == m["baseline_val_accuracy"] > m["winner_val_accuracy"]
    baseline_model, blob = load_checkpoint(baseline_ckpt)
    for name, tensor in baseline_model.state_dict().items():
        assert torch.equal(outcome.tuned.model.state_dict()[name].cpu(), tensor)
    assert outcome.tuned.params.train.lr == blob["config"]["train"]["lr"]
    summary = search_summary(outcome.metrics, outcome.best["params"])
    assert "models/tuned.pt is the BASELINE model" in summary


@pytest.mark.integration
def test_a_search_at_chance_level_fails_the_stage(tmp_path, tiny_params, digits_prepared):
    params = _params(
        tmp_path,
        tiny_params,
        n_trials=2,
        epochs=1,
        pruner="none",
        space={"lr": [1e-7, 2e-7], "batch_size": [128]},
    )
    data = DeviceData(digits_prepared, torch.device("cpu"))
    with pytest.raises(StageFailed, match="chance level") as info:
        search.run(params, data, None, None, progress=False)
    assert "search.space.lr [1e-07, 2e-07]" in str(info.value)


def test_chance_level_is_judged_with_the_noise(digits_prepared):
    data = DeviceData(digits_prepared, torch.device("cpu"))
    params = parse_params({})
    chance = torch.bincount(data.y["val"]).max().item() / len(data.y["val"])
    with pytest.raises(StageFailed):
        search.check_above_chance(chance + 0.02, data, params)  # within the noise of chance
    search.check_above_chance(chance + 0.12, data, params)  # clearly above: no error


def test_sampler_seeds_never_collide_and_depend_on_the_host():
    seeds = {
        study.sampler_seed(seed, worker, existing, "host-a")
        for seed in range(4)
        for worker in range(4)
        for existing in range(4)
    }
    assert len(seeds) == 64  # seed 1 / worker 0 is not seed 0 / worker 1 (was seed*1000+salt)
    assert study.sampler_seed(0, 0, 0, "a") == study.sampler_seed(0, 0, 0, "a")
    assert study.sampler_seed(0, 0, 0, "a") != study.sampler_seed(0, 0, 0, "b")


def test_two_machines_starting_one_study_draw_different_startup_trials(tiny_params):
    params = parse_params(tiny_params)
    draws = []
    for host in ("machine-a", "machine-b"):
        s = optuna.create_study(sampler=study.make_sampler(params, 0, 0, host))
        draws.append([s.ask().suggest_float("lr", 1e-3, 1, log=True) for _ in range(3)])
    assert draws[0] != draws[1]


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("tpe", optuna.samplers.TPESampler),
        ("random", optuna.samplers.RandomSampler),
        ("cmaes", optuna.samplers.CmaEsSampler),
        ("qmc", optuna.samplers.QMCSampler),
    ],
)
def test_every_sampler_option_builds_its_sampler(tmp_path, tiny_params, name, cls):
    sampler = study.make_sampler(_params(tmp_path, tiny_params, sampler=name, n_trials=60))
    assert type(sampler) is cls
    if name == "tpe":  # model-based after a sixth of the study; running trials count as liars
        assert sampler._n_startup_trials == 10
        assert sampler._constant_liar is True
        assert study.startup_trials(24) == 4 and study.startup_trials(6) == 3


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("successive_halving", optuna.pruners.SuccessiveHalvingPruner),
        ("hyperband", optuna.pruners.HyperbandPruner),
        ("median", optuna.pruners.MedianPruner),
        ("none", optuna.pruners.NopPruner),
    ],
)
def test_every_pruner_option_builds_its_pruner(tmp_path, tiny_params, name, cls):
    params = _params(
        tmp_path, tiny_params, pruner=name, epochs=9, min_epochs=2, reduction_factor=3
    )
    pruner = study.make_pruner(params)
    assert type(pruner) is cls
    if name == "successive_halving":
        assert (pruner._min_resource, pruner._reduction_factor) == (2, 3)
    if name == "hyperband":
        assert (pruner._min_resource, pruner._max_resource) == (2, 9)


@pytest.mark.integration
@pytest.mark.parametrize("pruner", ["successive_halving", "hyperband", "median"])
def test_every_pruner_stops_hopeless_trials_in_a_real_study(
    tmp_path, tiny_params, digits_prepared, pruner
):
    # half the space diverges or learns nothing (lr 5..20); every pruner must stop some trials
    params = _params(
        tmp_path,
        tiny_params,
        n_trials=10,
        epochs=4,
        pruner=pruner,
        sampler="random",
        space={"lr": [0.01, 20.0], "batch_size": [128]},
    )
    data = DeviceData(digits_prepared, torch.device("cpu"))
    result = search_study.run_study(params, data, "s", None, progress=False)
    states = [t.state for t in result.trials]
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states) == 10
    assert TrialState.PRUNED in states


@pytest.mark.integration
def test_timeout_stops_starting_trials(tmp_path, tiny_params, digits_prepared):
    data = DeviceData(digits_prepared, torch.device("cpu"))
    params = _params(tmp_path, tiny_params, n_trials=50, epochs=2, timeout_s=1e-6)
    result = search_study.run_study(params, data, "s", None, progress=False)
    assert [t for t in result.trials if t.state != TrialState.WAITING] == []
    with pytest.raises(StageFailed, match="no trial of study .* completed"):
        search.run(params, data, None, None, progress=False)


@pytest.mark.integration
def test_the_study_hands_back_torch_threads(tmp_path, tiny_params, digits_prepared):
    data = DeviceData(digits_prepared, torch.device("cpu"))
    before = torch.get_num_threads()
    different = (os.cpu_count() or 1) + 1  # never what the study sets for its worker
    torch.set_num_threads(different)
    try:
        params = _params(tmp_path, tiny_params, n_trials=1, epochs=1)
        search_study.run_study(params, data, "s", None, progress=False)
        assert torch.get_num_threads() == different
    finally:
        torch.set_num_threads(before)


def test_out_of_gpu_memory_fails_the_trial_with_its_batch_size(
    tmp_path, tiny_params, digits_prepared
):
    params = _params(tmp_path, tiny_params, space={"batch_size": [128]})
    data = DeviceData(digits_prepared, torch.device("cpu"))

    def out_of_memory(train_cfg, on_epoch):  # what fit raises when a batch does not fit
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    objective = study.make_objective(params, data, None, out_of_memory)
    s = optuna.create_study()
    s.optimize(objective, n_trials=2, catch=(study.TrialFailed,))
    assert [t.state for t in s.trials] == [TrialState.FAIL] * 2
    assert {t.user_attrs["fail_reason"] for t in s.trials} == {
        "out of GPU memory at batch_size=128"
    }


@pytest.mark.integration
def test_a_params_yaml_trial_enqueued_twice_runs_once(tmp_path, tiny_params, digits_prepared):
    """Two machines that start one study together both enqueue params.yaml's trial."""
    data = DeviceData(digits_prepared, torch.device("cpu"))
    params = _params(tmp_path, tiny_params, n_trials=3, epochs=1, pruner="none")
    s = study.load_study(params, "s")
    train = params.train
    fixed = {"lr": train.lr, "batch_size": train.batch_size, "weight_decay": train.weight_decay}
    for _ in range(2):
        s.enqueue_trial(fixed, user_attrs={"source": "params.yaml"})
    result = search_study.run_study(params, data, "s", None, progress=False)
    ran = [t for t in result.trials if t.state == TrialState.COMPLETE]
    assert len(ran) == 3
    assert sum(t.params == fixed for t in ran) == 1
    duplicate = result.trials[1]
    assert duplicate.state == TrialState.FAIL
    assert duplicate.user_attrs["fail_reason"] == "duplicate: params.yaml trial 0"
    rows = search_study.trial_rows(result)
    assert search_study.summarize(params, result, rows)["n_failed"] == 0


# ---- fast tests of the study and search decisions (in-memory Optuna studies, stand-in trainer)


def _fit(*accuracies, status="ok", message=""):
    from pipeline.engine import FitResult

    history = [{"train_loss": 1.0 / (i + 1), "val_accuracy": a} for i, a in enumerate(accuracies)]
    return FitResult(status, message, history)


def _cpu():
    from types import SimpleNamespace

    return SimpleNamespace(device=torch.device("cpu"))


def test_study_name_is_search_study_name_when_set():
    params = parse_params({"search": {"study_name": "mine"}})
    assert study_name(params, "sha") == "mine"


def test_study_name_is_a_digest_of_what_changes_the_objective():
    import dataclasses

    default = parse_params({})
    model = dataclasses.replace(default.model, name="torchvision:resnet18")
    name = study_name(dataclasses.replace(default, model=model), "abc")
    assert name == "digits-torchvision-resnet18-" + name.rsplit("-", 1)[1]
    digest = name.rsplit("-", 1)[1]
    assert len(digest) == 10 and int(digest, 16) >= 0
    assert study_name(parse_params({}), "abc") == "digits-cnn-596c5c2e0f"  # pinned recipe digest
    same = [
        {"train": {"lr": 0.2, "batch_size": 16, "weight_decay": 0.1, "epochs": 3}},
        {"search": {"n_trials": 5, "workers": 2, "timeout_s": 9, "storage": "sqlite:///x.db"}},
    ]
    for overrides in same:  # searched, replaced by search.epochs, or not in the objective
        assert study_name(parse_params(overrides), "abc") == "digits-cnn-596c5c2e0f"
    changed = [
        {"model": {"widths": [8]}},
        {"train": {"momentum": 0.5}},
        {"search": {"space": {"lr": [0.01, 0.1]}}},
        {"search": {"epochs": 5}},
        {"search": {"min_epochs": 2}},
        {"search": {"sampler": "random"}},
        {"search": {"pruner": "median"}},
        {"search": {"reduction_factor": 3}},
        {"seed": 1},
    ]
    names = {study_name(parse_params(o), "abc") for o in changed}
    names |= {study_name(parse_params({}), "abd")}
    assert len(names) == len(changed) + 1 and "digits-cnn-596c5c2e0f" not in names


def test_make_storage_sqlite_has_heartbeat_retry_and_a_lock_timeout(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the experimental heartbeat arguments warn silently
        storage = study.make_storage(f"sqlite:///{tmp_path / 'o.db'}")
    assert isinstance(storage, optuna.storages.RDBStorage)
    assert storage.engine_kwargs == {"connect_args": {"timeout": 60}}
    assert (storage.heartbeat_interval, storage.grace_period) == (2, 10)
    callback = storage.heartbeat_stale_trial_callback
    assert isinstance(callback, optuna.storages.RetryHeartbeatStaleTrialCallback)
    assert callback._max_retry == 3


def test_make_storage_server_urls_get_the_heartbeat_without_sqlite_options(monkeypatch):
    made = []
    monkeypatch.setattr(optuna.storages, "RDBStorage", lambda url, **kw: made.append((url, kw)))
    monkeypatch.setattr(optuna.storages, "get_storage", lambda url: ("plain", url))
    for url in ("postgresql://h/db", "mysql://h/db", "sqlite:///a.db"):
        study.make_storage(url)
    assert [url for url, _ in made] == ["postgresql://h/db", "mysql://h/db", "sqlite:///a.db"]
    assert [kw["engine_kwargs"] for _, kw in made] == [{}, {}, {"connect_args": {"timeout": 60}}]
    assert {(kw["heartbeat_interval"], kw["grace_period"]) for _, kw in made} == {(2, 10)}
    assert study.make_storage("redis://h") == ("plain", "redis://h")


def test_sampler_host_is_the_machine_for_joining_workers_and_folder_free_for_the_stage(
    monkeypatch, tmp_path
):
    monkeypatch.setattr(study.socket, "gethostname", lambda: "host-x")
    monkeypatch.delenv("PIPELINE_MACHINE_ID", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    for copy in ("a", "b"):
        (tmp_path / copy).mkdir()
    monkeypatch.chdir(tmp_path / "a")
    here = f"host-x:{tmp_path / 'a'}"
    assert study.machine_id() == here
    assert study.sampler_host(joining=True) == here
    assert study.sampler_host() == ""  # the stage: the same trials in any folder
    monkeypatch.chdir(tmp_path / "b")  # a second working copy on the same host: another machine
    assert study.sampler_host(joining=True) == f"host-x:{tmp_path / 'b'}"
    assert study.sampler_host() == ""
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "a"))  # a DVC experiment's copy: the project's
    assert study.sampler_host(joining=True) == here
    monkeypatch.setenv("PIPELINE_MACHINE_ID", "node-7")
    assert study.machine_id() == "node-7"
    assert study.sampler_host(joining=True) == study.sampler_host() == "node-7"


def test_sampler_seed_is_32_bits_and_hashes_every_part():
    assert study.sampler_seed(3, 1, 2) == study.sampler_seed(3, 1, 2, "")
    assert study.sampler_seed(3, 1, 2) != study.sampler_seed(3, 1, 2, "node-7")
    assert study.sampler_seed(0, 0, 0, "a") == 4070366536  # sha256('[0, "a", 0, 0]')[:8], hex
    assert study.sampler_seed(0, 0, 1, "a") != study.sampler_seed(0, 0, 0, "a")
    seeds = [study.sampler_seed(s, 0, 0, "a") for s in range(200)]
    assert max(seeds) < 2**32 and max(seeds) >= 2**31  # 8 hex digits, all of them used


def test_startup_trials_is_a_sixth_of_the_study_from_3_to_10():
    expected = {1: 3, 18: 3, 23: 3, 24: 4, 30: 5, 59: 9, 60: 10, 66: 10, 1000: 10}
    assert {n: study.startup_trials(n) for n in expected} == expected


def _draws(sampler, n=3):
    s = optuna.create_study(sampler=sampler)
    return [s.ask().suggest_float("lr", 1e-3, 1, log=True) for _ in range(n)]


def test_make_sampler_seeds_from_seed_worker_trial_count_and_host(tiny_params):
    raw = dict(tiny_params, seed=5)
    raw["search"] = {**raw["search"], "sampler": "random"}
    params = parse_params(raw)
    sampler = study.make_sampler(params, worker=2, existing=7, host="h")
    reference = optuna.samplers.RandomSampler(seed=study.sampler_seed(5, 2, 7, "h"))
    assert _draws(sampler) == _draws(reference)
    tpe = study.make_sampler(parse_params(tiny_params), 1, 4, "h")
    assert _draws(tpe) == _draws(
        optuna.samplers.RandomSampler(seed=study.sampler_seed(0, 1, 4, "h"))
    )
    assert tpe._multivariate is True and tpe._n_startup_trials == 3
    plain = study.make_sampler(params, host="h")  # worker 0 of a new study
    reference = optuna.samplers.RandomSampler(seed=study.sampler_seed(5, 0, 0, "h"))
    assert _draws(plain) == _draws(reference)


def test_make_sampler_options_are_seeded_and_quiet(tiny_params):
    import warnings

    def make(name):
        raw = dict(tiny_params)
        raw["search"] = {**raw["search"], "sampler": name}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return study.make_sampler(parse_params(raw), 1, 2, "h")

    seed = study.sampler_seed(0, 1, 2, "h")
    qmc = make("qmc")
    assert (qmc._seed, qmc._scramble, qmc._warn_independent_sampling) == (seed, True, False)
    cmaes = make("cmaes")
    assert cmaes._warn_independent_sampling is False
    reference = optuna.samplers.CmaEsSampler(seed=seed)._cma_rng.rng.get_state()[1]
    assert (cmaes._cma_rng.rng.get_state()[1] == reference).all()


def test_median_pruner_waits_for_min_epochs_and_five_trials(tmp_path, tiny_params):
    params = _params(tmp_path, tiny_params, pruner="median", epochs=9, min_epochs=3)
    pruner = study.make_pruner(params)
    assert (pruner._n_startup_trials, pruner._n_warmup_steps) == (5, 3)
    params = _params(tmp_path, tiny_params, pruner="hyperband", epochs=9, reduction_factor=4)
    assert study.make_pruner(params)._reduction_factor == 4


def test_load_study_creates_then_resumes_with_a_trial_count_seed(tmp_path, tiny_params):
    params = _params(tmp_path, tiny_params, sampler="random", pruner="successive_halving")
    optuna.logging.set_verbosity(optuna.logging.INFO)
    first = study.load_study(params, "s", worker=3)
    assert optuna.logging.get_verbosity() == optuna.logging.WARNING
    assert first.direction == optuna.study.StudyDirection.MAXIMIZE
    assert type(first.pruner) is optuna.pruners.SuccessiveHalvingPruner  # not Optuna's default
    host = study.sampler_host()  # the stage's: no folder in it
    assert host == os.environ.get("PIPELINE_MACHINE_ID", "")
    expected = optuna.samplers.RandomSampler(seed=study.sampler_seed(0, 3, 0, host))
    assert _draws(first.sampler) == _draws(expected)
    first.add_trial(optuna.trial.create_trial(value=0.5))
    first.add_trial(optuna.trial.create_trial(value=0.6))
    again = study.load_study(params, "s", worker=3)  # resumes: same study, seed from 2 trials
    assert again._study_id == first._study_id and len(again.trials) == 2
    expected = optuna.samplers.RandomSampler(seed=study.sampler_seed(0, 3, 2, host))
    assert _draws(again.sampler) == _draws(expected)
    worker_0 = study.load_study(params, "s")  # the main process: worker 0
    expected = optuna.samplers.RandomSampler(seed=study.sampler_seed(0, 0, 2, host))
    assert _draws(worker_0.sampler) == _draws(expected)
    joined = study.load_study(params, "s", joining=True)  # a search-worker machine
    expected = optuna.samplers.RandomSampler(seed=study.sampler_seed(0, 0, 2, study.machine_id()))
    assert _draws(joined.sampler) == _draws(expected)


def test_the_stage_draws_the_same_trials_in_any_folder(tmp_path, tiny_params, monkeypatch):
    """A fresh clone elsewhere, or a DVC `--temp` experiment, searches like the workspace."""
    monkeypatch.delenv("PIPELINE_MACHINE_ID", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    draws = {}
    for folder in ("clone-a", "elsewhere/clone-b"):
        (tmp_path / folder).mkdir(parents=True)
        monkeypatch.chdir(tmp_path / folder)
        params = _params(tmp_path / folder, tiny_params, sampler="random")
        draws[folder] = _draws(study.load_study(params, "s").sampler)
        joined = _draws(study.load_study(params, "s", joining=True).sampler)
        assert joined != draws[folder]  # a worker machine draws its own
    assert draws["clone-a"] == draws["elsewhere/clone-b"]


def test_load_study_turns_a_storage_error_into_a_config_error(tmp_path, tiny_params, monkeypatch):
    from pipeline.errors import ConfigError

    params = _params(tmp_path, tiny_params)

    def broken(url):
        raise ValueError("x" * 200 + "\nsecond line")

    monkeypatch.setattr(study, "make_storage", broken)
    with pytest.raises(ConfigError) as info:
        study.load_study(params, "s")
    expected = f"search.storage: got {params.search.storage!r}; cannot open it (ValueError: "
    assert str(info.value) == expected + "x" * 160 + ")"
    assert info.value.__cause__ is None and info.value.__suppress_context__

    def duplicated(url):
        raise optuna.exceptions.DuplicatedStudyError("taken")

    monkeypatch.setattr(study, "make_storage", duplicated)
    with pytest.raises(optuna.exceptions.DuplicatedStudyError):
        study.load_study(params, "s")


def _space_params(lr, batch_size, weight_decay):
    return parse_params(
        {
            "train": {"lr": lr, "batch_size": batch_size, "weight_decay": weight_decay},
            "search": {
                "space": {"lr": [0.01, 0.1], "batch_size": [32, 64], "weight_decay": [1e-4, 1e-2]}
            },
        }
    )


def test_enqueue_current_params_runs_params_yaml_first_when_inside_the_space():
    s = optuna.create_study()
    assert study.enqueue_current_params(s, _space_params(0.01, 32, 1e-4)) is True
    assert study.enqueue_current_params(s, _space_params(0.1, 64, 1e-2)) is False  # not new
    (waiting,) = s.trials
    assert waiting.state == TrialState.WAITING
    assert waiting.user_attrs == {"source": "params.yaml"}
    assert waiting.system_attrs["fixed_params"] == {
        "lr": 0.01,
        "batch_size": 32,
        "weight_decay": 1e-4,
    }
    assert study.enqueue_current_params(optuna.create_study(), _space_params(0.1, 64, 1e-2))
    outside = [(0.0099, 32, 1e-3), (0.11, 32, 1e-3), (0.05, 16, 1e-3)]
    outside += [(0.05, 32, 9e-5), (0.05, 32, 0.011)]
    for values in outside:
        s = optuna.create_study()
        assert study.enqueue_current_params(s, _space_params(*values)) is False
        assert s.trials == []


def test_counts_finished_running_and_waiting_trials():
    s = optuna.create_study()
    for state, n in [
        (TrialState.COMPLETE, 2),
        (TrialState.PRUNED, 3),
        (TrialState.FAIL, 4),
    ]:
        for _ in range(n):
            s.add_trial(
                optuna.trial.create_trial(
                    state=state, value=0.5 if state.name == "COMPLETE" else None
                )
            )
    for _ in range(6):
        s.enqueue_trial({"lr": 0.1})
    for _ in range(7):
        s.ask()  # the 6 waiting ones first, then a new one
    for _ in range(8):
        s.enqueue_trial({"lr": 0.2})
    assert study.counts(s) == {"finished": 5, "running": 7, "waiting": 8}
    assert study.counts(optuna.create_study()) == {"finished": 0, "running": 0, "waiting": 0}


def test_suggest_draws_from_the_configured_log_space():
    params = _space_params(0.05, 32, 1e-3)
    s = optuna.create_study()
    s.enqueue_trial({"lr": 0.02, "batch_size": 64, "weight_decay": 5e-3})
    trial = s.ask()
    assert study.suggest(trial, params) == {"lr": 0.02, "batch_size": 64, "weight_decay": 5e-3}
    d = trial.distributions
    assert d["lr"] == optuna.distributions.FloatDistribution(0.01, 0.1, log=True)
    assert d["batch_size"] == optuna.distributions.CategoricalDistribution([32, 64])
    assert d["weight_decay"] == optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)


def _add(s, state=TrialState.FAIL, **user_attrs):
    value = 0.5 if state == TrialState.COMPLETE else None
    s.add_trial(optuna.trial.create_trial(state=state, value=value, user_attrs=user_attrs))


def test_duplicate_of_names_the_first_params_yaml_trial_that_ran():
    s = optuna.create_study()
    _add(s, source="params.yaml", fail_reason="surplus")  # 0: stopped before training
    _add(s, source="params.yaml", fail_reason="duplicate: params.yaml trial 9")  # 1
    _add(s, TrialState.COMPLETE, source="sampler")  # 2
    first = s.ask()  # 3
    first.set_user_attr("source", "params.yaml")
    assert study._duplicate_of(first) is None  # nothing earlier ran it (itself does not count)
    _add(s, source="params.yaml", fail_reason="nan loss: diverged")  # 4: ran, then failed
    _add(s, TrialState.COMPLETE, source="params.yaml")  # 5
    second = s.ask()  # 6
    second.set_user_attr("source", "params.yaml")
    assert study._duplicate_of(second) == 3
    other = s.ask()  # 7
    assert study._duplicate_of(other) is None  # not a params.yaml trial


def test_the_heartbeat_retry_of_a_killed_params_yaml_trial_is_no_duplicate():
    s = optuna.create_study()
    _add(s, source="params.yaml")  # 0: its process died (FAIL, no reason recorded)
    retry = s.ask()  # 1: the retry copies the dead trial's attributes, its source too
    retry.set_user_attr("source", "params.yaml")
    assert study._duplicate_of(retry) is None
    _add(s, source="params.yaml", fail_reason="nan loss: diverged")  # 2: ran, failed
    copy = s.ask()  # 3
    copy.set_user_attr("source", "params.yaml")
    assert study._duplicate_of(copy) == 1  # the retry ran it


def test_is_surplus_counts_finished_and_running_trials_numbered_before():
    s = optuna.create_study()
    _add(s, TrialState.COMPLETE)  # 0
    _add(s, TrialState.PRUNED)  # 1
    _add(s, TrialState.FAIL)  # 2: does not count
    s.ask()  # 3: running
    s.enqueue_trial({"lr": 0.1})  # 4: waiting, does not count
    trial = s.ask()  # 4 (the waiting one, now running)
    s.ask()  # 5: running, after it
    assert trial.number == 4
    assert study._is_surplus(trial, 3) is True
    assert study._is_surplus(trial, 4) is False


def test_retried_trial_number_reads_the_heartbeat_retry_mark():
    s = optuna.create_study()
    plain = s.ask()
    retried = s.ask()
    s._storage.set_trial_system_attr(retried._trial_id, "failed_trial", 7)
    assert study._retried_trial_number(retried) == 7
    assert study._retried_trial_number(plain) is None
    s.tell(plain, 0.5)
    assert study._retried_trial_number(plain) is None  # only running trials are looked up


class _FakeRun:
    """Records what the objective sends to a trial's MLflow run (pipeline.tracking.ChildRun)."""

    made: list = []

    def __init__(self, params, parent_run_id, name, tags):
        self.config, self.parent, self.name, self.tags = params, parent_run_id, name, tags
        self.run_id = f"run-{name}"
        self.params, self.metrics, self.finished = None, [], None
        _FakeRun.made.append(self)

    def log_params(self, values):
        self.params = values

    def log_metrics(self, values, step):
        self.metrics.append((values, step))

    def finish(self, status, tags):
        self.finished = (status, tags)


def _objective_params(**search):
    return parse_params(
        {
            "train": {"lr": 0.05, "batch_size": 32, "weight_decay": 1e-3, "epochs": 30},
            "search": {
                "n_trials": 3,
                "epochs": 4,
                "space": {"lr": [0.01, 0.1], "batch_size": [32, 64], "weight_decay": [1e-4, 1e-2]},
                **search,
            },
        }
    )


def test_objective_trains_the_suggested_config_and_returns_its_last_epoch(monkeypatch):
    monkeypatch.setattr(study, "ChildRun", _FakeRun)
    _FakeRun.made = []
    params = _objective_params()
    seen = []

    def train_fn(recipe, on_epoch):
        seen.append(recipe.train)
        on_epoch(1, {"train_loss": 2.0, "val_accuracy": 0.5, "lr": 0.1})
        on_epoch(2, {"train_loss": 1.0, "val_accuracy": 0.9, "lr": 0.1})
        return _fit(0.5, 0.75)  # the last epoch's model is what ships: 0.75, not the best

    s = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    s.enqueue_trial({"lr": 0.02, "batch_size": 64, "weight_decay": 5e-3})
    objective = study.make_objective(params, _cpu(), "parent-1", train_fn, worker=3)
    s.optimize(objective, n_trials=1)
    (t,) = s.trials
    assert t.state == TrialState.COMPLETE and t.value == 0.75
    assert t.intermediate_values == {1: 0.5, 2: 0.9}
    (cfg,) = seen
    assert (cfg.lr, cfg.batch_size, cfg.weight_decay, cfg.epochs) == (0.02, 64, 5e-3, 4)
    assert dataclasses_replace_rest(cfg, params.train)
    assert t.user_attrs["worker"] == 3 and t.user_attrs["device"] == "cpu"
    assert t.user_attrs["epochs_run"] == 2 and "fail_reason" not in t.user_attrs
    assert 0 <= t.user_attrs["seconds"] < 60
    (run,) = _FakeRun.made
    assert (run.config, run.parent, run.name) == (params, "parent-1", "trial-000")
    assert run.tags == {
        "trial_number": 0,
        "state": "RUNNING",
        "worker": 3,
        "study": s.study_name,
        "device": "cpu",
    }
    assert t.user_attrs["mlflow_run_id"] == "run-trial-000"
    assert run.params == {"lr": 0.02, "batch_size": 64, "weight_decay": 5e-3, "trial_number": 0}
    assert run.metrics == [
        ({"train_loss": 2.0, "val_accuracy": 0.5}, 1),
        ({"train_loss": 1.0, "val_accuracy": 0.9}, 2),
        ({"objective": 0.75}, 2),
    ]
    status, tags = run.finished
    assert status == "FINISHED"
    assert tags == {"state": "COMPLETE", "duration_s": t.user_attrs["seconds"], "fail_reason": ""}


def test_objective_records_the_trial_seconds_to_the_millisecond(monkeypatch):
    from types import SimpleNamespace

    clock = iter([10.0, 12.3456789])
    monkeypatch.setattr(study, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    s = optuna.create_study(direction="maximize")
    objective = study.make_objective(_objective_params(), _cpu(), None, lambda c, e: _fit(0.6))
    objective(s.ask())
    assert s.trials[0].user_attrs["seconds"] == 2.346


def test_objective_out_of_memory_names_the_batch_size_in_its_error():
    def out_of_memory(train_cfg, on_epoch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    s = optuna.create_study(direction="maximize")
    s.enqueue_trial({"lr": 0.02, "batch_size": 64, "weight_decay": 5e-3})
    objective = study.make_objective(_objective_params(), _cpu(), None, out_of_memory)
    with pytest.raises(study.TrialFailed, match="^out of GPU memory at batch_size=64$") as info:
        objective(s.ask())
    assert info.value.__cause__ is None


def dataclasses_replace_rest(cfg, train) -> bool:
    """Every field but the searched ones and epochs is params.yaml's."""
    import dataclasses

    kept = [f.name for f in dataclasses.fields(train)]
    kept = [k for k in kept if k not in ("lr", "batch_size", "weight_decay", "epochs")]
    return bool(kept) and all(getattr(cfg, k) == getattr(train, k) for k in kept)


def test_objective_without_a_parent_run_logs_nothing(monkeypatch):
    monkeypatch.setattr(study, "ChildRun", _FakeRun)
    _FakeRun.made = []
    s = optuna.create_study(direction="maximize")
    objective = study.make_objective(_objective_params(), _cpu(), None, lambda c, e: _fit(0.6))
    s.optimize(objective, n_trials=1)
    assert s.trials[0].value == 0.6 and "mlflow_run_id" not in s.trials[0].user_attrs
    assert s.trials[0].user_attrs["worker"] == 0 and s.trials[0].user_attrs["epochs_run"] == 0
    assert _FakeRun.made == []


def test_objective_records_a_diverged_run_as_failed_with_its_message(monkeypatch):
    monkeypatch.setattr(study, "ChildRun", _FakeRun)
    _FakeRun.made = []

    def train_fn(train_cfg, on_epoch):
        on_epoch(1, {"train_loss": 9.0, "val_accuracy": 0.1})
        return _fit(0.1, status="diverged", message="loss is nan at epoch 2")

    s = optuna.create_study(direction="maximize")
    objective = study.make_objective(_objective_params(), _cpu(), "p", train_fn)
    with pytest.raises(study.TrialFailed, match="^loss is nan at epoch 2$"):
        objective(s.ask())
    s.optimize(objective, n_trials=1, catch=(study.TrialFailed,))
    t = s.trials[1]
    assert t.state == TrialState.FAIL
    assert t.user_attrs["fail_reason"] == "loss is nan at epoch 2"
    assert t.user_attrs["epochs_run"] == 1
    status, tags = _FakeRun.made[1].finished
    assert status == "FAILED"
    assert tags["state"] == "FAIL" and tags["fail_reason"] == "loss is nan at epoch 2"


class _AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return True


def test_objective_stops_a_pruned_trial_at_that_epoch(monkeypatch):
    monkeypatch.setattr(study, "ChildRun", _FakeRun)
    _FakeRun.made = []
    epochs = []

    def train_fn(train_cfg, on_epoch):
        for epoch in (1, 2, 3):
            epochs.append(epoch)
            on_epoch(epoch, {"train_loss": 1.0, "val_accuracy": 0.3})
        return _fit(0.3, 0.3, 0.3)

    s = optuna.create_study(direction="maximize", pruner=_AlwaysPrune())
    objective = study.make_objective(_objective_params(), _cpu(), "p", train_fn)
    with pytest.raises(optuna.TrialPruned, match="^pruned at epoch 1$"):
        objective(s.ask())
    s.optimize(objective, n_trials=1)
    t = s.trials[1]
    assert t.state == TrialState.PRUNED and epochs == [1, 1]
    assert t.user_attrs["epochs_run"] == 1 and "fail_reason" not in t.user_attrs
    assert _FakeRun.made[1].finished == (
        "KILLED",
        {"state": "PRUNED", "duration_s": t.user_attrs["seconds"], "fail_reason": ""},
    )


def test_objective_stops_surplus_and_duplicate_trials_before_training(monkeypatch):
    monkeypatch.setattr(study, "ChildRun", _FakeRun)
    _FakeRun.made = []

    def train_fn(train_cfg, on_epoch):
        raise AssertionError("no training for a trial stopped as bookkeeping")

    s = optuna.create_study(direction="maximize")
    for _ in range(3):
        _add(s, TrialState.COMPLETE)
    objective = study.make_objective(_objective_params(n_trials=3), _cpu(), "p", train_fn)
    with pytest.raises(study.TrialFailed, match=r"^surplus: the study already has search\.n_"):
        objective(s.ask())
    assert s.trials[3].user_attrs["fail_reason"] == "surplus"

    s = optuna.create_study(direction="maximize")
    _add(s, TrialState.COMPLETE, source="params.yaml")
    objective = study.make_objective(_objective_params(n_trials=3), _cpu(), "p", train_fn)
    trial = s.ask()
    trial.set_user_attr("source", "params.yaml")
    with pytest.raises(study.TrialFailed, match="^duplicate: the params.yaml trial was enqueued"):
        objective(trial)
    assert s.trials[1].user_attrs["fail_reason"] == "duplicate: params.yaml trial 0"
    assert _FakeRun.made == []


def test_objective_tags_a_heartbeat_retry_with_the_trial_it_reruns(monkeypatch):
    monkeypatch.setattr(study, "ChildRun", _FakeRun)
    _FakeRun.made = []
    s = optuna.create_study(direction="maximize")
    trial = s.ask()
    s._storage.set_trial_system_attr(trial._trial_id, "failed_trial", 4)
    objective = study.make_objective(_objective_params(), _cpu(), "p", lambda c, e: _fit(0.5))
    assert objective(trial) == 0.5
    assert _FakeRun.made[0].tags["retry_of_trial"] == 4


def test_reconcile_fails_the_runs_of_trials_whose_worker_died(monkeypatch):
    ended = []

    params = parse_params({})

    def end_stale_run(config, run_id, tags):
        assert config is params
        ended.append((run_id, tags))
        return 1

    monkeypatch.setattr(study, "end_stale_run", end_stale_run)
    s = optuna.create_study()
    _add(s, mlflow_run_id="dead-1")  # FAIL without a reason: its worker died
    _add(s, mlflow_run_id="failed", fail_reason="loss is nan")  # the objective closed it
    _add(s)  # no run
    _add(s, TrialState.COMPLETE, mlflow_run_id="done")
    _add(s, TrialState.PRUNED, mlflow_run_id="pruned")
    _add(s, mlflow_run_id="dead-2")
    assert study.reconcile_stale_runs(params, s) == 2
    tags = {"state": "FAIL", "fail_reason": "worker died (no heartbeat)"}
    assert ended == [("dead-1", tags), ("dead-2", tags)]


def test_fail_stale_trials_runs_optuna_quietly(monkeypatch):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fail_stale_trials is experimental: it warns
        study._fail_stale_trials(optuna.create_study())
    called = []
    monkeypatch.setattr(optuna.storages, "fail_stale_trials", called.append)
    s = optuna.create_study()
    study._fail_stale_trials(s)
    assert called == [s]


def test_run_worker_runs_until_n_trials_finished_and_goes_on_after_failures():
    s = optuna.create_study(direction="maximize")
    calls = []

    def objective(trial):
        calls.append(trial.number)
        if trial.number == 1:
            raise study.TrialFailed("nan")
        if trial.number == 2:
            raise optuna.TrialPruned()
        return 0.5

    progress = []
    study.run_worker(s, objective, 3, None, progress.append)
    assert calls == [0, 1, 2, 3]
    assert [t.state for t in s.trials] == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.PRUNED,
        TrialState.COMPLETE,
    ]
    assert [c["finished"] for c in progress] == [0, 1, 1, 2, 3]
    assert progress[-1] == {"finished": 3, "running": 0, "waiting": 0}
    study.run_worker(s, objective, 3, None)  # already finished: starts nothing
    assert len(s.trials) == 4


def test_run_worker_starts_no_trial_after_the_deadline():
    s = optuna.create_study()
    progress = []
    study.run_worker(s, lambda t: 0.5, 3, time.time() - 1, progress.append)
    assert s.trials == [] and progress == [{"finished": 0, "running": 0, "waiting": 0}]
    study.run_worker(s, lambda t: 0.5, 1, time.time() + 600)
    assert len(s.trials) == 1


def test_run_worker_still_starts_a_trial_at_the_deadline_itself(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(study, "time", SimpleNamespace(time=lambda: 100.0))
    s = optuna.create_study()
    study.run_worker(s, lambda t: 0.5, 1, 100.0)  # not past it yet
    assert len(s.trials) == 1


def test_run_worker_waits_for_other_workers_running_trials(capsys, monkeypatch):
    from types import SimpleNamespace

    sleeps = []
    monkeypatch.setattr(study, "time", SimpleNamespace(time=time.time, sleep=sleeps.append))
    s = optuna.create_study()
    _add(s, TrialState.COMPLETE)
    other = s.ask()  # another worker's trial, still running
    progress = []

    def on_progress(c):
        progress.append(c)
        if len(progress) == 2:  # after two rounds of waiting
            s.tell(other, 0.7)  # the other worker finishes it

    study.run_worker(s, lambda t: 0.5, 2, None, on_progress)
    assert len(s.trials) == 2  # started none itself
    assert [c["running"] for c in progress] == [1, 1, 0]
    assert sleeps == [0.5, 0.5]
    err = capsys.readouterr().err
    assert err.count("search: waiting for 1 running trial(s) of other workers") == 1
    assert "(a dead worker's trial is retried after 10 s)" in err


def test_run_worker_runs_a_queued_trial_even_when_enough_are_running():
    s = optuna.create_study()
    _add(s, TrialState.COMPLETE)
    other = s.ask()
    s.enqueue_trial({"lr": 0.1})  # e.g. a dead worker's trial re-queued by the heartbeat
    ran = []

    def objective(trial):
        ran.append(trial.number)
        s.tell(other, 0.1)
        return 0.5

    study.run_worker(s, objective, 2, None)
    assert ran == [2]


def _search_study():
    s = optuna.create_study(direction="maximize")
    params = {"lr": 0.02, "batch_size": 64, "weight_decay": 1e-3}
    dists = {
        "lr": optuna.distributions.FloatDistribution(0.01, 0.1, log=True),
        "batch_size": optuna.distributions.CategoricalDistribution([32, 64]),
        "weight_decay": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
    }

    def add(state, value=None, steps=0, **attrs):
        s.add_trial(
            optuna.trial.create_trial(
                state=state,
                value=value,
                params=params,
                distributions=dists,
                user_attrs=attrs,
                intermediate_values={i + 1: 0.1 for i in range(steps)},
            )
        )

    add(TrialState.COMPLETE, 0.8, 4, epochs_run=4, seconds=2.5, worker=0)  # 0
    add(TrialState.PRUNED, None, 1, epochs_run=1, seconds=0.5, worker=1)  # 1
    add(TrialState.COMPLETE, 0.9, 4, epochs_run=4, seconds=2.0, worker=1)  # 2
    add(TrialState.FAIL, None, 1, epochs_run=2, fail_reason="loss is nan at epoch 2")  # 3
    add(TrialState.FAIL, None, 0, epochs_run=0, fail_reason="surplus")  # 4
    add(TrialState.FAIL, None, 0, epochs_run=0, fail_reason="duplicate: params.yaml trial 0")
    add(TrialState.PRUNED, None, 2)  # 6: no epochs_run recorded (an older trial): its reports
    return s


def test_trial_rows_one_per_trial_with_params_and_bookkeeping():
    rows = search_study.trial_rows(_search_study())
    assert rows[0] == {
        "number": 0,
        "state": "COMPLETE",
        "lr": 0.02,
        "batch_size": 64,
        "weight_decay": 1e-3,
        "width": None,  # architecture and cost: a Pareto search only
        "depth": None,
        "value": 0.8,
        "objective_cost": None,
        "latency_ms": None,
        "macs": None,
        "params": None,
        "epochs_run": 4,
        "seconds": 2.5,
        "worker": 0,
        "fail_reason": "",
    }
    assert [r["number"] for r in rows] == list(range(7))
    assert [r["state"] for r in rows][1:4] == ["PRUNED", "COMPLETE", "FAIL"]
    assert rows[3]["fail_reason"] == "loss is nan at epoch 2" and rows[3]["value"] is None
    assert rows[3]["epochs_run"] == 2  # recorded: it diverged in epoch 2, after 1 report
    assert rows[6]["epochs_run"] == 2  # from its reported epochs
    assert (rows[6]["seconds"], rows[6]["worker"], rows[6]["fail_reason"]) == (None, None, "")


def test_summarize_counts_real_trials_and_the_epochs_pruning_saved(tiny_params):
    s = _search_study()
    params = parse_params({"search": {"epochs": 4}})
    summary = search_study.summarize(params, s, search_study.trial_rows(s))
    assert summary == {
        "study_name": s.study_name,
        "best_trial_val_accuracy": 0.9,
        "best_trial": 2,
        "n_complete": 2,
        "n_pruned": 2,
        "n_failed": 1,  # surplus and duplicate trials are bookkeeping, not failures
        "epochs_spent": 4 + 1 + 4 + 2 + 2,
        "epochs_saved_by_pruning": (4 - 1) + (4 - 2),
        "epochs_without_pruning": 4 * 4,  # complete + pruned trials at full length
    }


def test_summarize_rounds_the_best_value_to_6_digits():
    s = optuna.create_study(direction="maximize")
    s.add_trial(optuna.trial.create_trial(value=0.123456789))
    summary = search_study.summarize(parse_params({}), s, search_study.trial_rows(s))
    assert summary["best_trial_val_accuracy"] == 0.123457


def test_worker_threads_split_this_process_cpus(monkeypatch):
    monkeypatch.setattr(
        search_study.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False
    )
    monkeypatch.setattr(search_study.os, "cpu_count", lambda: 64)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert [search_study._worker_threads(w) for w in (1, 2, 3, 8, 9)] == [8, 4, 2, 1, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's share (dvc queue start -j 4)
    assert [search_study._worker_threads(w) for w in (1, 2, 3)] == [2, 1, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "16")  # more than this process may use: the cpuset
    assert search_study._worker_threads(1) == 8
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delattr(search_study.os, "sched_getaffinity", raising=False)
    assert search_study._worker_threads(4) == 16  # no affinity: every CPU
    monkeypatch.setattr(search_study.os, "cpu_count", lambda: None)
    assert search_study._worker_threads(1) == 1 and search_study._worker_threads(2) == 1


def _labels(counts):
    from types import SimpleNamespace

    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return SimpleNamespace(y={"val": y})


def test_check_above_chance_uses_the_majority_class_and_the_wilson_bound():
    data = _labels([60, 20, 20])  # chance: 0.6 on 100 images
    params = parse_params({"search": {"epochs": 7, "space": {"lr": [0.001, 0.01]}}})
    # 100 images: the 95 % Wilson lower bound of 70 / 100 is 0.604, of 69 / 100 0.594
    search.check_above_chance(0.70, data, params)
    search.check_above_chance(0.696, data, params)  # rounds to 70 hits
    with pytest.raises(StageFailed) as info:
        search.check_above_chance(0.69, data, params)
    assert str(info.value) == (
        "search: every trial is at chance level (best val accuracy 0.6900 on 100 images, "
        "chance 0.6000); nothing was learnt: check search.space.lr [0.001, 0.01] and "
        "search.epochs (7)"
    )
    search.check_above_chance(0.2, _labels([5, 5, 5, 5, 5, 5, 5, 5, 5, 5]), params)


def test_check_above_chance_fails_when_the_bound_only_reaches_chance(monkeypatch):
    monkeypatch.setattr(search, "accuracy_interval", lambda correct: (0.6, 0.8))
    with pytest.raises(StageFailed):
        search.check_above_chance(0.7, _labels([60, 40]), parse_params({}))
    monkeypatch.setattr(search, "accuracy_interval", lambda correct: (0.600001, 0.8))
    search.check_above_chance(0.7, _labels([60, 40]), parse_params({}))


class _Predicts(torch.nn.Module):
    """Predicts the class one-hot encoded in its half of the input (`view` 0 or 1)."""

    def __init__(self, k, view):
        super().__init__()
        self.k, self.view = k, view

    def forward(self, x):
        return x[:, self.view * self.k : (self.view + 1) * self.k]


def _shipped(view, k=4):
    return search.Shipped(f"view-{view}", _Predicts(k, view), {}, parse_params({}), {})


def _predictions_data(first_wrong, second_wrong, n=200, k=4):
    """val data on which model view 0 misses `first_wrong` images, view 1 `second_wrong`."""
    from types import SimpleNamespace

    y = torch.arange(n) % k
    first, second = y.clone(), y.clone()
    first[:first_wrong] = (y[:first_wrong] + 1) % k
    second[n - second_wrong :] = (y[n - second_wrong :] + 1) % k
    x = torch.cat([torch.eye(k)[first], torch.eye(k)[second]], dim=1)
    return SimpleNamespace(device=torch.device("cpu"), x={"val": x}, y={"val": y})


def test_choose_tuned_keeps_the_winner_unless_the_baseline_is_clearly_better():
    winner, baseline = _shipped(0), _shipped(1)
    data = _predictions_data(0, 0)
    assert search.choose_tuned(winner, None, data) == (winner, None)
    chosen, difference = search.choose_tuned(winner, baseline, data)  # equal: [0, 0]
    assert chosen is winner and (difference.difference, difference.high) == (0.0, 0.0)
    chosen, difference = search.choose_tuned(winner, baseline, _predictions_data(0, 50))
    assert chosen is winner and difference.difference == 0.25 and difference.n_images == 200
    # baseline better by 3 images of 200: within the noise (interval reaches 0), winner stays
    chosen, difference = search.choose_tuned(winner, baseline, _predictions_data(3, 0))
    assert chosen is winner and difference.difference == -0.015 and difference.high >= 0
    # better by 40 images: beyond the noise, the baseline ships
    chosen, difference = search.choose_tuned(winner, baseline, _predictions_data(40, 0))
    assert chosen is baseline and difference.difference == -0.2 and difference.high < 0
