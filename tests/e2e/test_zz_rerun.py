"""Runs last (file name): re-running `dvc repro` on the shared e2e project, then changing it."""

import json

import pytest
import yaml

from tests.conftest import write_params
from tests.e2e.conftest import dvc

pytestmark = pytest.mark.slow


def test_second_repro_runs_nothing_and_a_param_change_reruns_train_only(e2e_project):
    project, _ = e2e_project
    output = dvc(project, "repro")
    assert "Running stage" not in output
    assert "is cached" in output or "didn't change" in output
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["epochs"] = 2
    write_params(project, params)
    output = dvc(project, "repro")
    assert "Running stage 'train'" in output and "Running stage 'prepare'" not in output
    assert json.loads((project / "metrics" / "train.json").read_text())["epochs"] == 2
