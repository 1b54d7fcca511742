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

from pipeline import search, study
from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.config import parse_params
from pipeline.data import DeviceData, prepare
from pipeline.errors import StageFailed
from pipeline.reporting import search_summary
from pipeline.study import reconcile_stale_runs, study_name
from pipeline.tracking import ChildRun, stage_run
from pipeline.train import train_and_evaluate
from tests.conftest import copy_project, run_module, subprocess_env, write_params


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
def test_search_prunes_hopeless_trials_and_tracks_every_trial(
    tmp_path, tiny_params, digits_prepared, baseline_ckpt
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
    # the winner is retrained exactly as its trial was scored, so it reproduces its score
    n_val = len(data.y["val"])
    assert abs(m["retrained_val_accuracy"] - m["best_trial_val_accuracy"]) <= 2 / n_val
    baseline_blob = torch.load(baseline_ckpt, weights_only=True)
    assert m["baseline_val_accuracy"] == baseline_blob["metrics"]["val_accuracy"]
    assert m["baseline_test_accuracy"] == baseline_blob["metrics"]["test_accuracy"]
    assert m["search_minus_baseline_val_n_images"] == n_val
    low, high = m["search_minus_baseline_val_low"], m["search_minus_baseline_val_high"]
    assert low <= m["search_minus_baseline_val_difference"] <= high
    # shipped: the winner unless the baseline is better beyond the noise
    assert m["tuned_source"] == ("baseline" if high < 0 else "search")
    if m["tuned_source"] == "search":
        assert m["tuned_val_accuracy"] == m["retrained_val_accuracy"]
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


@pytest.mark.integration
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
    metrics = json.loads((project / "metrics" / "search.json").read_text())
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
        space={"lr": [0.002, 0.004], "batch_size": [128]},
    )
    data = DeviceData(digits_prepared, torch.device("cpu"))
    outcome = search.run(params, data, baseline_ckpt, None, progress=False)
    m = outcome.metrics
    assert m["search_minus_baseline_val_high"] < 0
    assert m["tuned_source"] == "baseline" and outcome.tuned.source == "baseline"
    assert m["tuned_val_accuracy"] == m["baseline_val_accuracy"] > m["retrained_val_accuracy"]
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
    result = search.run_study(params, data, "s", None, progress=False)
    states = [t.state for t in result.trials]
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states) == 10
    assert TrialState.PRUNED in states


@pytest.mark.integration
def test_timeout_stops_starting_trials(tmp_path, tiny_params, digits_prepared):
    data = DeviceData(digits_prepared, torch.device("cpu"))
    params = _params(tmp_path, tiny_params, n_trials=50, epochs=2, timeout_s=1e-6)
    result = search.run_study(params, data, "s", None, progress=False)
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
        search.run_study(params, data, "s", None, progress=False)
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
    result = search.run_study(params, data, "s", None, progress=False)
    ran = [t for t in result.trials if t.state == TrialState.COMPLETE]
    assert len(ran) == 3
    assert sum(t.params == fixed for t in ran) == 1
    duplicate = result.trials[1]
    assert duplicate.state == TrialState.FAIL
    assert duplicate.user_attrs["fail_reason"] == "duplicate: params.yaml trial 0"
    rows = search.trial_rows(result)
    assert search.summarize(params, result, rows)["n_failed"] == 0
