"""Runs last (file name): re-running `dvc repro` on the shared e2e project, then changing it."""

import json

import pytest
import yaml

from tests.conftest import write_params
from tests.e2e.conftest import dvc, stages_run

pytestmark = pytest.mark.slow


def test_second_repro_runs_nothing_and_a_param_change_reruns_train_only(e2e_project):
    project, _ = e2e_project
    output = dvc(project, "repro")
    assert "Running stage" not in output
    assert "is cached" in output or "didn't change" in output
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["epochs"] = 2
    write_params(project, params)
    # up to train: the stages after it follow in the next test's repro (one re-run of them)
    output = dvc(project, "repro", "train")
    assert stages_run(output) == ["train"], output
    assert json.loads((project / "reports" / "train.json").read_text())["epochs"] == 2


def test_more_trials_reruns_search_only_and_runs_only_the_missing_trials(e2e_project):
    import optuna

    project, _ = e2e_project
    storage = f"sqlite:///{project / 'studies' / 'optuna.db'}"
    params = yaml.safe_load((project / "params.yaml").read_text())
    name = json.loads((project / "reports" / "search.json").read_text())["study_name"]
    before = [t.params for t in optuna.load_study(study_name=name, storage=storage).trials]
    params["search"]["n_trials"] = params["search"]["n_trials"] + 2
    write_params(project, params)
    output = dvc(project, "repro")
    assert "Running stage 'search'" in output and "Running stage 'train'" not in output
    after = optuna.load_study(study_name=name, storage=storage).trials
    assert len(after) == len(before) + 2
    assert [t.params for t in after[: len(before)]] == before
    metrics = json.loads((project / "reports" / "search.json").read_text())
    assert metrics["n_complete"] + metrics["n_pruned"] == params["search"]["n_trials"]
