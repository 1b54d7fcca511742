"""The train stage data-parallel under torchrun (`train.nproc: 2`, gloo on CPU), for real:
two processes on digits match one process, write one checkpoint and one MLflow run, and a
killed rank fails the stage quickly with one line."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import load_checkpoint
from tests.conftest import (
    TINY_PARAMS,
    copy_project,
    run_module,
    subprocess_env,
    write_params,
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    project = copy_project(tmp_path_factory.mktemp("ddp") / "project")
    write_params(project, TINY_PARAMS)
    done = run_module(project, "pipeline.prepare")
    assert done.returncode == 0, done.stderr
    return project


def _with_train(project: Path, **train) -> None:
    params = json.loads(json.dumps(TINY_PARAMS))
    params["train"].update(train)
    write_params(project, params)


def _train_runs(project: Path) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id], "tags.stage = 'train'")
    return sorted(runs, key=lambda r: r.info.start_time)


def test_two_processes_match_one_and_write_one_checkpoint_and_one_run(prepared):
    _with_train(prepared, nproc=1)
    one = run_module(prepared, "pipeline.train")
    assert one.returncode == 0, one.stderr
    single = json.loads((prepared / "reports" / "train.json").read_text())
    assert single["processes"] == 1

    _with_train(prepared, nproc=2)
    two = run_module(prepared, "pipeline.train")
    assert two.returncode == 0, two.stderr
    report = json.loads((prepared / "reports" / "train.json").read_text())
    assert report["processes"] == 2 and report["epochs"] == TINY_PARAMS["train"]["epochs"]
    # same global batch (64 = 2 x 32): within 1 point of one process on the test split
    assert abs(report["test_accuracy"] - single["test_accuracy"]) <= 0.01, (report, single)
    assert report["test_accuracy"] > 0.85
    assert two.stderr.count("baseline cnn:") == 1  # rank 0 alone reports

    blob = torch.load(prepared / "models" / "baseline.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in blob["state_dict"])  # unwrapped module
    model, _ = load_checkpoint(prepared / "models" / "baseline.pt")
    x = torch.load(prepared / "data" / "prepared" / "test.pt", weights_only=True)
    info = json.loads((prepared / "data" / "prepared" / "dataset.json").read_text())
    mean = torch.tensor(info["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(info["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        logits = model((x["images"].float() / 255 - mean) / std)
    accuracy = (logits.argmax(1) == x["labels"]).float().mean().item()
    assert accuracy == pytest.approx(report["test_accuracy"], abs=1 / len(x["labels"]))

    runs = _train_runs(prepared)
    assert len(runs) == 2  # one per stage execution: ranks other than 0 log nothing
    ddp_run = runs[-1]
    assert ddp_run.info.status == "FINISHED"
    assert ddp_run.data.metrics["processes"] == 2
    client = MlflowClient(tracking_uri=f"sqlite:///{prepared / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(ddp_run.info.run_id, "train_loss")]
    assert steps == list(range(1, TINY_PARAMS["train"]["epochs"] + 1))  # logged once per epoch


# An MLP (no BatchNorm, whose statistics are per rank) on digits: DDP over 2 ranks of 32 images
# must take the same SGD steps as one process on the global batch of 64.
EXACT = {"seed": 0, "device": "cpu", "model": {"name": "mlp", "hidden": [64]}}
EXACT_TRAIN = {"epochs": 2, "lr": 0.05, "batch_size": 64, "scheduler": "none"}


def _fit_one(world: int, rank: int = 0, port: int = 0, out: str = ""):
    """`fit` as rank `rank` of `world` (a real gloo group when world > 1); rank 0 saves the
    state and the history to `out` and returns them."""
    from pipeline import distributed
    from pipeline.checkpoint import arch_spec, build_model
    from pipeline.config import parse_params
    from pipeline.data import DeviceData, prepare
    from pipeline.engine import fit

    if world > 1:
        env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world, "MASTER_PORT": port}
        os.environ.update({k: str(v) for k, v in env.items()}, MASTER_ADDR="127.0.0.1")
    threads = torch.get_num_threads()  # this runs in pytest's own process too (world 1):
    torch.set_num_threads(1)  # a later test must not inherit one thread (its numerics change)
    try:
        params = parse_params({**EXACT, "train": EXACT_TRAIN})
        data = DeviceData(prepare(params.data, seed=0), torch.device("cpu"))
        with distributed.process_group(data.device, 60, "test"):
            torch.manual_seed(0)
            model = build_model(arch_spec(params, data.info))
            result = fit(model, data, params.train, seed=0, progress=False)
    finally:
        torch.set_num_threads(threads)
    state = {"state": model.state_dict(), "history": result.history}
    if out and rank == 0:
        torch.save(state, out)
    return state


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_fit_takes_the_same_steps_as_one_process_on_the_global_batch(tmp_path):
    out = tmp_path / "rank0.pt"
    torch.multiprocessing.spawn(
        _spawned_fit, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method="spawn"
    )
    ddp = torch.load(out, weights_only=True)
    one = _fit_one(1)
    for key, tensor in one["state"].items():
        assert torch.allclose(ddp["state"][key], tensor, atol=1e-5), key
    for a, b in zip(ddp["history"], one["history"], strict=True):
        assert a["train_accuracy"] == b["train_accuracy"]  # global count over global batches
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_accuracy"] == b["val_accuracy"]


def _spawned_fit(rank: int, world: int, port: int, out: str) -> None:
    """torch.multiprocessing.spawn's entry (rank first)."""
    _fit_one(world, rank, port, out)


def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The worker process of `rank` that the launcher `launcher_pid` started."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher_pid and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


def _epochs_logged(project: Path) -> int:
    try:
        with sqlite3.connect(project / "mlflow.db", timeout=1) as db:
            query = (
                "SELECT COUNT(*) FROM metrics m JOIN runs r ON m.run_uuid = r.run_uuid "
                "WHERE r.status = 'RUNNING' AND m.key = 'val_accuracy'"
            )
            return db.execute(query).fetchone()[0]
    except sqlite3.Error:
        return 0


def test_a_killed_rank_fails_the_stage_with_one_line_and_no_hang(prepared):
    _with_train(prepared, nproc=2, epochs=2000, ddp_timeout_s=30)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.train"],
        cwd=prepared,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    try:
        deadline = time.monotonic() + 120
        while _epochs_logged(prepared) < 1:  # rank 0 logged its first epoch
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        victim = _rank_pid(proc.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert time.monotonic() - killed < 30  # torchrun stopped rank 0; no collective timeout
    assert proc.returncode == 1
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("failed: train: rank 1 of 2 was killed by SIGKILL"), stderr
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr
    assert len(lines) <= 2, stderr  # rank 0's own line at most, then the summary
    # torchrun's agent messages went to its log, not the console
    assert "(exitcode: -9) local_rank: 1" in (prepared / "logs" / "torchrun-train.log").read_text()
    assert _train_runs(prepared)[-1].info.status == "FAILED"  # rank 0 closed its run


def test_search_retrain_and_compress_fine_tuning_run_in_train_nproc_processes(prepared):
    """`train.nproc: 2` also covers the search's final retrain (its trials keep one process)
    and the compress fine-tuning: one record each saying 2 processes, one MLflow run each,
    the fine-tuning curve logged once per epoch (rank 0 alone), the tuned model carrying its
    config and scoring the chosen trial's val accuracy within noise."""
    _with_train(prepared, nproc=2)
    search = run_module(prepared, "pipeline.search")
    assert search.returncode == 0, search.stderr
    report = json.loads((prepared / "reports" / "search.json").read_text())
    assert report["winner_retrained"] is True and report["retrain_processes"] == 2
    # the trial trained in one process, the retrain in two: the same recipe, within 4 images
    assert abs(report["winner_val_accuracy"] - report["best_trial_val_accuracy"]) <= 0.015
    _, blob = load_checkpoint(prepared / "models" / "tuned.pt")
    assert blob["config"]["train"]["nproc"] == 2
    assert blob["metrics"]["processes"] == 2

    compress = run_module(prepared, "pipeline.compress")
    assert compress.returncode == 0, compress.stderr
    record = json.loads((prepared / "reports" / "compress.json").read_text())
    assert record["finetune_processes"] == 2
    assert compress.stderr.count("variant ") == 1  # rank 0 alone prints the table
    client = MlflowClient(tracking_uri=f"sqlite:///{prepared / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tests")
    (run,) = client.search_runs([experiment.experiment_id], "tags.stage = 'compress'")
    assert run.info.status == "FINISHED"
    tuned = [a for a in record["attempts"] if a["ratio"] > 0 and a["same_widths_as"] is None]
    epochs = TINY_PARAMS["compress"]["finetune_epochs"] * len(tuned)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "finetune_train_loss")]
    assert sorted(steps) == list(range(1, epochs + 1))
