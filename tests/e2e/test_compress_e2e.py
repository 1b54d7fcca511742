"""The compress stage inside the real `dvc repro` (tiny params), read back as export would."""

import json

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from pipeline import onnx_tools, paths
from pipeline.checkpoint import load_checkpoint
from pipeline.data import load_prepared
from pipeline.variants import NAMES

pytestmark = pytest.mark.slow

ONNX_FILES = [f"model_{name}.onnx" for name in NAMES]


def test_compress_stage_wrote_every_variant_and_judged_it(e2e_project):
    project, output = e2e_project
    assert "Running stage 'compress'" in output
    m = json.loads((project / "reports" / "compress.json").read_text())
    assert m["macs_before"] > m["macs_after"] > 0 and m["params_before"] > m["params_after"] > 0
    attempts, budget = m["attempts"], m["max_accuracy_drop"]
    assert attempts[0]["ratio"] == m["prune_ratio_requested"] == 0.5
    assert (m["val_images"], m["test_images"]) == (270, 360)
    for a in attempts:  # judged on val against the tuned PyTorch model, on the point estimate
        diff = a["val_difference"]
        assert diff["n_images"] == 270 and diff["low"] <= diff["difference"] <= diff["high"]
        assert a["val_accuracy"] - diff["difference"] == pytest.approx(
            m["tuned_pytorch_val_accuracy"], abs=1e-5
        )
        assert a["within_budget"] == (diff["difference"] >= -budget and a["status"] == "ok")
    # the first ratio if within budget, else bisection: the largest ratio within budget, or
    # (none) the most accurate on val
    within = [a["ratio"] for a in attempts if a["within_budget"]]
    fallback = max(attempts, key=lambda a: (a["val_accuracy"], -a["ratio"]))["ratio"]
    assert m["prune_ratio"] == (max(within) if within else fallback)
    assert len(attempts) == (1 if attempts[0]["within_budget"] else 1 + 4)  # backoff_steps 4
    by_ratio = {a["ratio"]: a for a in attempts}
    for a in attempts:  # a ratio that gives already-tried widths is not fine-tuned again
        if a["same_widths_as"] is not None:
            same = by_ratio[a["same_widths_as"]]
            assert (a["macs"], a["val_accuracy"], a["finetune_seconds"]) == (
                same["macs"],
                same["val_accuracy"],
                0,
            )
    for v in m["variants"]:
        path = project / v["path"]
        assert path.name in ONNX_FILES and path.stat().st_size == v["size_bytes"]
        assert v["accepted"] == (v["val_difference"]["difference"] >= -budget)
        assert v["reason"] and 0.8 < v["test_accuracy"] <= 1
    assert [v["name"] for v in m["variants"]] == list(NAMES)
    assert m["int8_agreement"] >= 0.99 and m["fp16_agreement"] >= 0.99
    rows = (project / "plots" / "compression.csv").read_text().splitlines()
    assert len(rows) == 1 + 4
    assert (project / "plots" / "compression.png").read_bytes()[:4] == b"\x89PNG"
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["compress"]
    assert {o["path"] for o in lock["outs"]} == {
        "models/compressed",
        "metrics/compress.json",
        "reports/compress.json",
        "plots/compression.csv",
        "plots/compression.png",
    }
    assert lock["params"]["params.yaml"]["compress"]["finetune_epochs"] == 2


def test_pruned_checkpoint_matches_its_onnx_file(e2e_project):
    project, _ = e2e_project
    blob = torch.load(project / "models/compressed/pruned.pt", weights_only=True)
    assert blob["arch"]["pruned"]["layers"]  # narrower than the tuned model
    model, _ = load_checkpoint(project / "models/compressed/pruned.pt")
    images = load_prepared(project / "data" / "prepared").splits["test"][0][:64]
    norm = blob["normalization"]
    x = (images.float() / 255 - torch.tensor(norm["mean"]).view(1, -1, 1, 1)) / torch.tensor(
        norm["std"]
    ).view(1, -1, 1, 1)
    session, _ = onnx_tools.make_session(project / paths.PRUNED_FP32_ONNX, "cpu")
    with torch.no_grad():
        expected = model(x).numpy()
    # the file takes the uint8 pixels and normalises them itself
    logits = onnx_tools.run_logits(session, onnx_tools.pixels_nhwc(images))
    assert np.abs(logits - expected).max() < 1e-4


def test_compress_mlflow_run_has_variants_and_onnx_artifacts(e2e_project):
    project, _ = e2e_project
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tests")
    (run,) = client.search_runs([experiment.experiment_id], "tags.stage = 'compress'")
    m = json.loads((project / "reports" / "compress.json").read_text())
    for short in NAMES:
        for key in (f"{short}_val_accuracy", f"{short}_test_accuracy"):
            assert run.data.metrics[key] == pytest.approx(m[key])
    assert run.data.params["compress.prune_steps"] == "1"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "onnx")}
    assert artifacts == {f"onnx/{name}" for name in ONNX_FILES}
