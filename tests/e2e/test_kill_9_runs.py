"""Tracking failures of real stage processes: a stage (train, compress, export) killed with
kill -9 cannot end its MLflow run, so the next run of the stage ends it as FAILED, tagged with
why, and its own run finishes normally; a stage facing an unreachable tracking server exits 2
with one line within 15 s."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.config import parse_params
from pipeline.data import prepare, save_prepared
from pipeline.tracking import PID_TAG
from tests.conftest import REPO_ROOT, TINY_PARAMS, run_module, subprocess_env, write_params
from tests.e2e.conftest import copy_built_project

PYTHONPATH = {"PYTHONPATH": str(REPO_ROOT)}  # a project copy's own pipeline/ comes first


def _running_stage_run(client: MlflowClient, stage: str):
    try:
        experiment = client.get_experiment_by_name("tests")
        if experiment is None:
            return None
        runs = client.search_runs(
            [experiment.experiment_id], f"tags.stage = '{stage}' and attributes.status = 'RUNNING'"
        )
    except Exception:  # the child is still creating the database
        return None
    return runs[0] if runs and PID_TAG in runs[0].data.tags else None


def _kill_9_while_running(project: Path, stage: str, client: MlflowClient):
    """Start `python -m pipeline.<stage>` in `project`, kill -9 it as soon as its MLflow run is
    RUNNING (tagged with its pid); return the killed run, still RUNNING (nobody ended it)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", f"pipeline.{stage}"],
        cwd=project,
        env=subprocess_env(PYTHONPATH),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline, killed = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None:
        killed = _running_stage_run(client, stage)
        if killed is not None:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    proc.wait()
    assert killed is not None, f"the {stage} stage ended before it could be killed"
    assert killed.data.tags[PID_TAG] == str(proc.pid)
    assert client.get_run(killed.info.run_id).info.status == "RUNNING"
    return killed


def _assert_the_next_run_ended_it(project: Path, stage: str, client: MlflowClient, killed):
    """Run the stage again to the end: the killed run is FAILED with a `failure` tag naming its
    process, and the new run FINISHED."""
    rerun = run_module(project, f"pipeline.{stage}", env=PYTHONPATH)
    assert rerun.returncode == 0, rerun.stderr
    dead = client.get_run(killed.info.run_id)
    assert dead.info.status == "FAILED"
    assert dead.data.tags["failure"].startswith(f"process {killed.data.tags[PID_TAG]} on ")
    assert dead.data.tags["failure"].endswith(f"found by the next {stage} run")
    experiment = client.get_experiment_by_name("tests").experiment_id
    runs = client.search_runs([experiment], f"tags.stage = '{stage}'")
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]


def test_a_train_stage_killed_with_kill_9_has_its_run_ended_failed_by_the_next(tmp_path):
    raw = dict(TINY_PARAMS, train=dict(TINY_PARAMS["train"], epochs=5000))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    save_prepared(prepare(parse_params(raw).data, seed=0), tmp_path / "data" / "prepared")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    killed = _kill_9_while_running(tmp_path, "train", client)

    raw["train"]["epochs"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    _assert_the_next_run_ended_it(tmp_path, "train", client, killed)
    experiment = client.get_experiment_by_name("tests").experiment_id
    assert len(client.search_runs([experiment])) == 2  # no other stage ran


# a value that keeps the stage busy for hours once its run started
ENDLESS = {"compress": ("finetune_epochs", 100_000), "export": ("warmup_runs", 10**9)}


@pytest.mark.parametrize("stage", sorted(ENDLESS))
def test_a_stage_of_a_built_project_killed_with_kill_9_has_its_run_ended_by_the_next(
    e2e_project, tmp_path, stage
):
    project = copy_built_project(e2e_project[0], tmp_path / "project")
    params = yaml.safe_load((project / "params.yaml").read_text())
    endless = copy.deepcopy(params)
    key, value = ENDLESS[stage]
    endless[stage][key] = value
    write_params(project, endless)
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    killed = _kill_9_while_running(project, stage, client)

    write_params(project, params)
    _assert_the_next_run_ended_it(project, stage, client, killed)


def test_a_stage_facing_an_unreachable_tracking_server_exits_2_within_15_s(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    save_prepared(prepare(parse_params(TINY_PARAMS).data, seed=0), tmp_path / "data" / "prepared")
    env = {"PYTHONPATH": str(REPO_ROOT), "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    start = time.monotonic()
    proc = run_module(tmp_path, "pipeline.train", env=env)
    assert time.monotonic() - start < 15
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: MLFLOW_TRACKING_URI: got 'http://127.0.0.1:9'; no tracking server answers there "
        "([Errno 111] Connection refused); start it, fix the URI, or set tracking.enabled: false"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "params.yaml"]
