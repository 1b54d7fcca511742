"""Tracking failures of real stage processes: a stage killed with kill -9 cannot end its MLflow
run, so the next run of the stage ends it as FAILED, tagged with why, and its own run finishes
normally; a stage facing an unreachable tracking server exits 2 with one line within 15 s."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import yaml
from mlflow.tracking import MlflowClient

from pipeline.config import parse_params
from pipeline.data import prepare, save_prepared
from pipeline.tracking import PID_TAG
from tests.conftest import REPO_ROOT, TINY_PARAMS, run_module, subprocess_env


def _running_train_run(client: MlflowClient):
    try:
        experiment = client.get_experiment_by_name("tests")
        if experiment is None:
            return None
        runs = client.search_runs(
            [experiment.experiment_id], "tags.stage = 'train' and attributes.status = 'RUNNING'"
        )
    except Exception:  # the child is still creating the database
        return None
    return runs[0] if runs and PID_TAG in runs[0].data.tags else None


def test_a_train_stage_killed_with_kill_9_has_its_run_ended_failed_by_the_next(tmp_path):
    raw = dict(TINY_PARAMS, train=dict(TINY_PARAMS["train"], epochs=5000))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    save_prepared(prepare(parse_params(raw).data, seed=0), tmp_path / "data" / "prepared")
    env = subprocess_env({"PYTHONPATH": str(REPO_ROOT)})
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.train"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    deadline, killed = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None:
        killed = _running_train_run(client)
        if killed is not None:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    proc.wait()
    assert killed is not None, "the train stage ended before it could be killed"
    assert killed.data.tags[PID_TAG] == str(proc.pid)
    assert client.get_run(killed.info.run_id).info.status == "RUNNING"  # nobody ended it

    raw["train"]["epochs"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    rerun = run_module(tmp_path, "pipeline.train", env={"PYTHONPATH": str(REPO_ROOT)})
    assert rerun.returncode == 0, rerun.stderr

    dead = client.get_run(killed.info.run_id)
    assert dead.info.status == "FAILED"
    assert dead.data.tags["failure"].startswith(f"process {proc.pid} on ")
    assert dead.data.tags["failure"].endswith("found by the next train run")
    experiment = client.get_experiment_by_name("tests").experiment_id
    statuses = sorted(r.info.status for r in client.search_runs([experiment]))
    assert statuses == ["FAILED", "FINISHED"]


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
