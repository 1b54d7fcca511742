"""The export stage inside the real five-stage `dvc repro`, used as a user would use its output."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline import onnx_tools
from pipeline.files import sha256_file
from pipeline.variants import NAMES
from tests.conftest import VENV_BIN, subprocess_env

pytestmark = pytest.mark.slow

VARIANT_NAMES = list(NAMES)


def _manifest(project) -> dict:
    return json.loads((project / "exported_models" / "manifest.json").read_text())


def test_every_manifest_variant_loads_and_matches_its_hash(e2e_project):
    project, output = e2e_project
    assert "Running stage 'export'" in output
    manifest = _manifest(project)
    assert [e["name"] for e in manifest["variants"]] == VARIANT_NAMES
    assert sum(e["recommended"] for e in manifest["variants"]) == 1
    x = np.zeros((3, 8, 8, 1), np.uint8)  # uint8 pixels, N x H x W x C
    for entry in manifest["variants"]:
        path = project / entry["path"]
        assert sha256_file(path) == entry["sha256"] and path.stat().st_size == entry["size_bytes"]
        session, provider = onnx_tools.session_for(path)
        assert provider == "CPUExecutionProvider"
        assert onnx_tools.run_logits(session, x).shape == (3, 10)  # dynamic batch
        assert entry["parity"]["passed"] and entry["latency_ms_p50_b1"] > 0
    metrics = json.loads((project / "reports" / "export.json").read_text())
    assert metrics["recommended"] == manifest["recommended"]
    if not torch.cuda.is_available():
        assert metrics["gpu"] == "not available"
    compress = json.loads((project / "reports" / "compress.json").read_text())
    by_name = {e["name"]: e for e in manifest["variants"]}
    # the same files, the same runtime, the same val images as the compress stage judged
    assert by_name["int8"]["val_accuracy"] == pytest.approx(compress["int8_val_accuracy"])
    assert by_name["int8"]["test_accuracy"] == pytest.approx(compress["int8_test_accuracy"])
    assert by_name["int8"]["val_difference"]["difference"] == pytest.approx(
        compress["int8_val_difference"]
    )
    assert by_name["pruned_fp32"]["macs"] == compress["macs_after"]


def test_pipeline_predict_classifies_real_digit_pngs_with_each_variant(e2e_project, tmp_path):
    project, _ = e2e_project
    blob = torch.load(project / "data" / "prepared" / "test.pt", weights_only=True)
    images, labels = blob["images"][:, 0].numpy(), blob["labels"].numpy()
    files = []
    for i in range(100):
        files.append(tmp_path / f"digit_{i:03d}.png")
        Image.fromarray(images[i]).save(files[-1])
    for name in VARIANT_NAMES:
        model = project / "exported_models" / f"model_{name}.onnx"
        command = [str(VENV_BIN / "pipeline"), "predict", str(model), *map(str, files), "--json"]
        process = subprocess.run(
            command, cwd=project, capture_output=True, text=True, env=subprocess_env()
        )
        assert process.returncode == 0 and process.stderr == "", process.stderr
        results = json.loads(process.stdout)
        assert [r["image"] for r in results] == [str(f) for f in files]
        top1 = np.array([int(r["top"][0]["label"]) for r in results])
        assert (top1 == labels[:100]).mean() >= 0.9, name


def test_the_recommended_variant_is_the_registered_champion(e2e_project):
    project, _ = e2e_project
    manifest = _manifest(project)
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("tune-compress-classifier", "champion")
    recommended = next(e for e in manifest["variants"] if e["recommended"])
    assert champion.tags["name"] == recommended["name"]
    assert champion.tags["sha256"] == recommended["sha256"]
    run = client.get_run(champion.run_id)
    assert run.data.tags["stage"] == "export"
    assert run.data.metrics[f"{recommended['name']}_test_accuracy"] == pytest.approx(
        recommended["test_accuracy"]
    )
