"""The real `dvc repro` on a copy of the project with tiny params, read back as a user would."""

import json
import subprocess

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


def test_stages_ran_and_metrics_are_sane(e2e_project):
    project, output = e2e_project
    assert "Running stage 'prepare'" in output and "Running stage 'train'" in output
    metrics = json.loads((project / "reports" / "train.json").read_text())
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


def test_mlflow_run_holds_params_and_per_epoch_metrics(e2e_project):
    project, _ = e2e_project
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
    metrics = json.loads((project / "reports" / "train.json").read_text())
    assert run.data.metrics["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "plots")]
    assert artifacts == ["plots/train_curve.png"]
