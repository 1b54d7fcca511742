"""The real `dvc repro` on a copy of the project with tiny params, read back as a user would."""

import json
import subprocess

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import copy_project, subprocess_env, write_params

pytestmark = pytest.mark.slow


def dvc(project, *args):
    proc = subprocess.run(
        ["dvc", *args],
        cwd=project,
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from tests.conftest import TINY_PARAMS

    project = copy_project(tmp_path_factory.mktemp("e2e") / "project")
    write_params(project, TINY_PARAMS)
    output = dvc(project, "repro")
    return project, output


def test_stages_ran_and_metrics_are_sane(project):
    project, output = project
    assert "Running stage 'prepare'" in output and "Running stage 'train'" in output
    metrics = json.loads((project / "metrics" / "train.json").read_text())
    assert metrics["status"] == "ok"
    assert metrics["epochs"] == 4
    assert 0.8 < metrics["test_accuracy"] <= 1.0
    assert 0.8 < metrics["val_accuracy"] <= 1.0
    assert metrics["images_per_second"] > 0 and metrics["device"] == "cpu"
    info = json.loads((project / "data" / "prepared" / "dataset.json").read_text())
    assert info["counts"]["train"] + info["counts"]["val"] + info["counts"]["test"] == 1797
    curve = (project / "plots" / "train_curve.csv").read_text().splitlines()
    assert curve[0].startswith("epoch,") and len(curve) == 1 + 4
    assert (project / "plots" / "train_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_mlflow_run_holds_params_and_per_epoch_metrics(project):
    project, _ = project
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id], "tags.stage = 'train'")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["train.lr"] == "0.05"
    assert run.data.params["model.widths"] == "[16, 32]"
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True
    ).stdout.strip()
    assert run.data.tags["git_commit"] == head + "-dirty"  # the test rewrote params.yaml
    assert len(run.data.tags["dataset_sha256"]) == 64
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    metrics = json.loads((project / "metrics" / "train.json").read_text())
    assert run.data.metrics["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "plots")]
    assert artifacts == ["plots/train_curve.png"]


def test_second_repro_runs_nothing_and_a_param_change_reruns_train_only(project):
    project, _ = project
    output = dvc(project, "repro")
    assert "Running stage" not in output
    assert "is cached" in output or "didn't change" in output
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["epochs"] = 2
    write_params(project, params)
    output = dvc(project, "repro")
    assert "Running stage 'train'" in output and "Running stage 'prepare'" not in output
    assert json.loads((project / "metrics" / "train.json").read_text())["epochs"] == 2
