"""Runs late (file name): `dvc repro -f -s export` once more on the shared e2e project (`-s`:
the export stage alone; `-f` with a target also re-runs every stage upstream of it).

The champion is stable: identical inputs give byte-identical model files (no run id, no timing
in them), the registry keeps one version per file sha256, and the alias moves only for a
variant faster beyond the measured noise, so identical runs leave one version and the same
champion.
"""

import json

import pytest
from mlflow.tracking import MlflowClient

from tests.e2e.conftest import dvc

pytestmark = pytest.mark.slow

REGISTERED = "tune-compress-classifier"


def _registry(project):
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    champion = client.get_model_version_by_alias(REGISTERED, "champion")
    versions = client.search_model_versions(f"name = '{REGISTERED}'")
    return champion, sorted(int(v.version) for v in versions)


def test_identical_export_runs_leave_one_version_and_the_same_champion(e2e_project):
    project, _ = e2e_project
    champion, versions = _registry(project)
    assert versions == [int(champion.version)]  # the first export registered one file
    manifest = json.loads((project / "exported_models" / "manifest.json").read_text())
    hashes = [{e["name"]: e["sha256"] for e in manifest["variants"]}]
    output = dvc(project, "repro", "-f", "-s", "export")  # the fixture's repro was the first
    ran = [line for line in output.splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'export':"], output
    manifest = json.loads((project / "exported_models" / "manifest.json").read_text())
    hashes.append({e["name"]: e["sha256"] for e in manifest["variants"]})
    again, versions = _registry(project)
    why = [line for line in output.splitlines() if "@champion" in line]  # the stage's verdict
    assert versions == [int(champion.version)] and again.version == champion.version, why
    assert again.tags["sha256"] == champion.tags["sha256"]
    assert again.tags["sha256"] in hashes[-1].values()  # the same file, exported again
    if manifest["recommended"] == again.tags["name"]:  # the card of the run that confirmed
        card = (project / "exported_models" / "MODEL_CARD.md").read_text()
        assert again.description == card
    assert hashes[0] == hashes[1]  # byte-identical models from identical inputs
