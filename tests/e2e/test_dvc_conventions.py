"""A queued DVC experiment (`dvc exp run --queue`, run by `dvc queue start` in a temporary copy
of the project) keeps its MLflow runs, artifacts, registry versions and Optuna study in the
project's own stores; `dvc exp show` then shows every metric in a 200-column terminal."""

import re
import subprocess
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient

from pipeline import compress, export, search, train
from tests.conftest import TINY_PARAMS, copy_project, subprocess_env, write_params
from tests.e2e.conftest import dvc

pytestmark = pytest.mark.slow

STAGES = ("prepare", "train", "search", "compress", "export")


def _commit(project):
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for args in (["add", "-A"], ["commit", "-qm", "tiny params"]):
        subprocess.run([*git, *args], cwd=project, check=True, capture_output=True)


def _dvc(project, *args, env: dict | None = None) -> str:
    proc = subprocess.run(
        ["dvc", *args],
        cwd=project,
        capture_output=True,
        text=True,
        env=subprocess_env(env),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def queued(tmp_path_factory):
    """A project (no `dvc repro` of its own) after one queued experiment ran to the end."""
    project = copy_project(tmp_path_factory.mktemp("queued") / "project")
    write_params(project, TINY_PARAMS)
    _commit(project)
    dvc(project, "exp", "run", "--queue", "--name", "tiny", "-S", "search.n_trials=3")
    dvc(project, "queue", "start")
    deadline = time.time() + 1500
    while True:
        status = dvc(project, "queue", "status")
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        assert time.time() < deadline, status
        time.sleep(5)
    assert re.search(r"\btiny\b.*\bSuccess\b", status), status + dvc(
        project, "queue", "logs", "tiny"
    )
    return project


def test_a_queued_experiment_keeps_its_records_in_the_projects_stores(queued):
    project = queued
    assert not (project / "metrics").exists()  # it ran in a copy, not in the workspace
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tests")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = {
        stage: client.search_runs([experiment.experiment_id], f"tags.stage = '{stage}'")
        for stage in STAGES
    }
    assert {stage: len(found) for stage, found in runs.items()} == dict.fromkeys(STAGES, 1)
    (prepare,) = runs["prepare"]
    assert (
        prepare.data.metrics["train_images"]
        + prepare.data.metrics["val_images"]
        + (prepare.data.metrics["test_images"])
        == 1797
    )
    assert len(prepare.data.tags["dataset_sha256"]) == 64
    (search_run,) = runs["search"]  # the flattened params, like every stage; -S applied
    assert search_run.data.params["search.n_trials"] == "3"
    assert search_run.data.params["train.lr"] == "0.05"
    # artifacts: in the project's mlruns/, still there after DVC removed its copy
    (train_run,) = runs["train"]
    artifact_dir = train_run.info.artifact_uri.removeprefix("file://")
    assert artifact_dir.startswith(str(project / "mlruns"))
    assert [a.path for a in client.list_artifacts(train_run.info.run_id, "plots")] == [
        "plots/train_curve.png"
    ]
    versions = client.search_model_versions("name = 'tune-compress-classifier'")
    assert len(versions) >= 1
    storage = f"sqlite:///{project / 'studies' / 'optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    assert summary.n_trials >= 3


def test_exp_show_fits_every_metric_in_200_columns(queued):
    # the paged view (what `dvc exp show` prints in a terminal) is as wide as the table; the
    # metrics come right after Experiment and Created, params and deps follow to the right
    table = _dvc(queued, "exp", "show", env={"DVC_PAGER": "cat", "COLUMNS": "200"})
    lines = table.splitlines()
    header = next(line for line in lines if "Experiment" in line)
    names = [*train.METRIC_KEYS, *search.METRIC_KEYS, *compress.METRIC_KEYS]
    names += list(export.METRIC_KEYS)
    first_screen = header[:200]
    missing = [n for n in names if not re.search(rf"(?<![\w./:]){n}(?![\w])", first_screen)]
    assert missing == [], f"not in the first 200 columns: {missing}\n{header[:400]}"
    row = next(line for line in lines if "tiny" in line)
    start = header.index(names[0])
    end = header.index(names[-1]) + len(names[-1])
    metrics = row[start:end].split()  # the experiment's metrics: numbers only
    assert len(metrics) == len(names), f"{names}\n{row[start:end]}"
    assert all(re.fullmatch(r"-?\d+(\.\d+)?(e-?\d+)?", value) for value in metrics), metrics
