"""The Pareto search (`search.objectives: [accuracy, latency]`) as a user runs it: kill -9 in
the middle of a trial and resume with two workers, then `dvc repro` with a latency budget, on the
real sqlite Optuna storage, the real MLflow store and real ONNX Runtime timings."""

from __future__ import annotations

import copy
import csv
import json
import subprocess
import sys

import optuna
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pipeline import pareto
from pipeline.checkpoint import load_checkpoint
from tests.conftest import (
    TINY_PARAMS,
    copy_project,
    kill_9_when,
    run_module,
    subprocess_env,
    write_params,
)
from tests.e2e.conftest import dvc, stages_run

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _pareto_params(**search):
    raw = copy.deepcopy(TINY_PARAMS)
    raw["search"] = {
        "n_trials": 6,
        "epochs": 3,
        "objectives": ["accuracy", "latency"],
        "space": {"lr": [0.005, 0.5], "width": [0.5, 1.0]},
        **search,
    }
    return raw


def _load(project):
    storage = f"sqlite:///{project / 'studies' / 'optuna.db'}"
    return optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)


def _trials_or_none(project):
    try:
        return _load(project).trials
    except Exception:  # the database is being created
        return []


def test_kill_9_mid_trial_of_a_pareto_study_then_resume_with_two_workers(tmp_path):
    n = 8
    project = copy_project(tmp_path / "project")
    epochs = 60  # rungs at epochs 1, 2, 4, 8, 16, 32: a long last stretch to kill it in
    raw = _pareto_params(n_trials=n, epochs=epochs)
    write_params(project, raw)
    assert run_module(project, "pipeline.prepare").returncode == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.search"],
        cwd=project,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def late_in_a_trial():
        # past rung 16, with epochs to go (the params.yaml trial, first at every rung, is
        # never stopped): a window of 40 epochs, wide enough on a fast machine too
        running = [
            t.number
            for t in _trials_or_none(project)
            if t.state == TrialState.RUNNING
            and 16 < len(t.user_attrs.get("val_accuracy_by_epoch") or []) <= epochs - 4
        ]
        return running[0] if running else None

    killed = kill_9_when(proc, late_in_a_trial)
    assert killed is not None, "the search ended before it could be killed"

    raw["search"]["workers"] = 2  # the same study (workers do not name it), two processes
    write_params(project, raw)
    # a user re-runs at once, while the dead trial's heartbeat is still fresh: the workers run
    # trials up to n_trials with it counted as running, wait for its heartbeat to go stale
    # (GRACE_PERIOD_S), then fail it and run its retry
    rerun = run_module(project, "pipeline.search")
    assert rerun.returncode == 0, rerun.stderr
    study = _load(project)
    real = [t for t in study.trials if t.user_attrs.get("fail_reason") != "surplus"]
    assert sum(t.state in FINISHED for t in real) == n
    assert not {TrialState.RUNNING, TrialState.WAITING} & {t.state for t in study.trials}
    assert study.trials[killed].state == TrialState.FAIL
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].params == study.trials[killed].params
    assert {t.user_attrs.get("worker", 0) for t in real} <= {0, 1}
    # the early stopping worked: some trials stopped, and each ran at most its epochs
    done = [t for t in real if t.state in FINISHED]
    curves = {t.number: t.user_attrs["val_accuracy_by_epoch"] for t in done}
    assert any(t.state == TrialState.PRUNED for t in done)
    assert all(len(curves[t.number]) == t.user_attrs["epochs_run"] for t in done)
    assert all(len(curves[t.number]) == epochs for t in done if t.state == TrialState.COMPLETE)
    # trials stop only at a rung
    stops = {len(curves[t.number]) for t in done if t.state == TrialState.PRUNED}
    assert stops <= {1, 2, 4, 8, 16, 32}
    # one measurement per architecture, shared by every trial of that width
    costs = {t.params["width"]: t.user_attrs["latency_ms"] for t in done}
    for t in done:
        assert t.user_attrs["latency_ms"] == costs[t.params["width"]]
        assert t.values is None or t.values[1] == costs[t.params["width"]]
    cached = [k for k in study.user_attrs if k.startswith("cost:")]
    assert len(cached) == len(costs) + (1.0 not in costs)  # + the widest, for the reference
    # MLflow: one run per trial number, none left RUNNING, the dead one FAILED, one parent,
    # and every trial that started training logged its measured cost
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("tests").experiment_id], "tags.trial_number != ''"
    )
    numbers = [int(r.data.tags["trial_number"]) for r in runs]
    assert len(numbers) == len(set(numbers))
    assert all(r.info.status != "RUNNING" for r in runs)
    by_number = {int(r.data.tags["trial_number"]): r for r in runs}
    assert by_number[killed].info.status == "FAILED"
    assert len({r.data.tags["mlflow.parentRunId"] for r in runs}) == 1
    for t in done:
        metrics = by_number[t.number].data.metrics
        assert metrics["latency_ms"] == t.user_attrs["latency_ms"]
        assert metrics["objective_latency"] == t.user_attrs["latency_ms"]
        assert metrics["macs"] == t.user_attrs["macs"] and metrics["params"] > 0
        expected = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED"}[t.state]
        assert by_number[t.number].info.status == expected


def test_dvc_repro_with_a_latency_budget_ships_the_most_accurate_front_trial_within_it(
    tmp_path,
):
    project = copy_project(tmp_path / "project")
    raw = _pareto_params()
    raw["train"]["epochs"] = 1  # a weak baseline: the chosen trial ships, not the baseline
    write_params(project, raw)
    dvc(project, "repro", "search")
    front = list(csv.DictReader((project / "studies" / "pareto.csv").open()))
    assert len(front) >= 1
    study = _load(project)
    complete = {
        t.number: (t.values[0], t.values[1])
        for t in study.trials
        if t.state == TrialState.COMPLETE
    }
    assert [int(r["number"]) for r in front] == pareto.pareto_front(complete)
    metrics = json.loads((project / "metrics" / "search.json").read_text())
    assert metrics["n_pareto"] == len(front)
    assert metrics["selected_trial"] == max(
        complete, key=lambda n: (complete[n][0], -complete[n][1], -n)
    )
    assert metrics["hypervolume"] > 0

    # a budget between the cheapest and the dearest front trial (measured on this machine)
    latencies = sorted(float(r["latency"]) for r in front)
    budget = latencies[0] if len(latencies) == 1 else (latencies[0] + latencies[-1]) / 2
    raw["search"]["select"] = {"latency_budget_ms": budget}
    write_params(project, raw)
    # the study resumes: no new trial, the chosen one retrained (compress and export, which
    # read only models/tuned.pt, are the single-objective e2e project's)
    output = dvc(project, "repro", "search")
    assert stages_run(output) == ["search"], output
    study = _load(project)
    assert sum(t.state in FINISHED for t in study.trials) == 6
    fits = {n: p for n, p in complete.items() if p[1] <= budget}
    chosen = max(fits, key=lambda n: (fits[n][0], -fits[n][1], -n))
    metrics = json.loads((project / "metrics" / "search.json").read_text())
    assert metrics["selected_trial"] == chosen
    rows = list(csv.DictReader((project / "studies" / "pareto.csv").open()))
    assert [r["selected"] for r in rows].count("True") == 1
    report = json.loads((project / "reports" / "search.json").read_text())
    assert report["tuned_source"] == "search"
    assert report["selected_latency"] == complete[chosen][1] <= budget
    model, blob = load_checkpoint(project / "models" / "tuned.pt")
    width = study.trials[chosen].params["width"]
    assert blob["arch"]["options"]["widths"] == [max(1, round(c * width)) for c in (16, 32)]
    assert blob["config"]["train"]["lr"] == study.trials[chosen].params["lr"]
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.out_channels == max(1, round(16 * width))

    # an infeasible budget: exit 2, one line naming the cheapest front trial
    raw["search"]["select"] = {"latency_budget_ms": latencies[0] / 1000}
    write_params(project, raw)
    proc = run_module(project, "pipeline.search")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: search.select.latency_budget_ms: got ")
    assert f"the cheapest measures {latencies[0]:.6g} ms" in line
