"""The test split decides nothing: change only its labels and every choice stays the same.

A copy of the project runs the real stages (`python -m pipeline.<stage>`: prepare, train,
compress, export; the trained baseline is copied to `models/tuned.pt`, the search stage's
checkpoint format, so the search's own choice stays out of this test). Then only the labels in
`data/prepared/test.pt` change: they become the tuned model's own predictions. On that test
split the tuned model is perfect and each pruned variant loses exactly the images where it
disagrees with the tuned model, more than the tight budget allows, while on the real labels it
was within budget: a guard that read the test split would now back off and reject. A random
permutation would not do: every variant would fall to chance together and nothing would change.

Compress and export run again; the pruned widths, every ratio tried, every `accepted` flag and
the recommendation must be identical, and only the reported test numbers may change.

The recommendation also reads measured latency, which differs between any two runs by timer
noise alone. `champion.recommend` is a pure function of the accepted flags, sizes and latencies
(with their spread), so the second run's entries are judged with the first run's latencies:
what remains can differ only through what the test labels changed.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from pipeline import champion, paths
from pipeline.checkpoint import load_checkpoint
from pipeline.data import SPLITS, DeviceData, _tensor_sha256, load_prepared, save_prepared
from pipeline.engine import predict_logits
from pipeline.variants import NAMES
from tests.conftest import copy_project, run_module, write_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BUDGET = 0.0  # the tightest: a variant may lose nothing (one test image is 0.28 points)
PARAMS = {
    "seed": 0,
    "device": "cpu",
    "data": {"name": "digits", "val_fraction": 0.15, "test_fraction": 0.2},
    "model": {"name": "cnn", "widths": [32, 64, 128]},
    "train": {"epochs": 15, "lr": 0.05, "batch_size": 64},
    "tracking": {"enabled": False},
    "compress": {
        "prune_steps": 1,
        "finetune_epochs": 4,
        "calibration_images": 64,
        "max_accuracy_drop": BUDGET,
        "backoff_steps": 2,
    },
    "export": {"warmup_runs": 2, "latency_runs": 20},
}
SHORT = NAMES  # fp32 (the tuned model), pruned_fp32, int8, fp16


def _stage(project, module: str) -> None:
    process = run_module(project, module)
    assert process.returncode == 0, f"{module}:\n{process.stderr}"


def _outcome(project) -> dict:
    """What a run decided and reported: compress.json, the manifest, the pruned widths."""
    blob = torch.load(project / paths.PRUNED_CKPT, weights_only=True)
    return {
        "compress": json.loads((project / "reports" / "compress.json").read_text()),
        "manifest": json.loads((project / paths.EXPORT_MANIFEST).read_text()),
        "widths": blob["arch"]["pruned"],
    }


def _label_test_split_with_tuned_predictions(project) -> None:
    """test labels := the tuned model's top-1 (PyTorch, CPU). Written through the project's own
    `save_prepared`, with dataset.json's hashes recomputed (`load_prepared` does not check them:
    a stale hash would pass unnoticed and mislabel every tag and manifest that cites it)."""
    prepared = load_prepared(project / paths.PREPARED_DIR)
    model, _ = load_checkpoint(project / paths.TUNED_CKPT)
    x = DeviceData(prepared, torch.device("cpu")).x["test"]
    predictions = predict_logits(model, x, amp=False).argmax(1)
    images, labels = prepared.splits["test"]
    assert 0 < int((predictions != labels).sum()) < 20  # a good model, not a perfect one
    prepared.splits["test"] = (images, predictions)
    hashes = prepared.info["sha256"]
    hashes["test"] = _tensor_sha256(images, predictions)
    hashes["all"] = hashlib.sha256("".join(hashes[s] for s in SPLITS).encode()).hexdigest()
    save_prepared(prepared, project / paths.PREPARED_DIR)
    reread = load_prepared(project / paths.PREPARED_DIR)
    assert torch.equal(reread.splits["test"][1], predictions)
    assert torch.equal(reread.splits["val"][1], prepared.splits["val"][1])


def _recommend_timed_as(entries: list[dict], timed: list[dict]) -> str:
    """`champion.recommend` on `entries` with the batch-1 latencies measured in `timed`."""
    keys = ("latency_ms_p50_b1", "latency_spread_ms")
    latency = {e["name"]: {k: e[k] for k in keys} for e in timed}
    return champion.recommend([e | latency[e["name"]] for e in entries])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(outcome with the real test labels, outcome with the tuned model's predictions)."""
    project = copy_project(tmp_path_factory.mktemp("relabel") / "project")
    write_params(project, PARAMS)
    for stage in ("pipeline.prepare", "pipeline.train"):
        _stage(project, stage)
    shutil.copy(project / paths.BASELINE_CKPT, project / paths.TUNED_CKPT)
    outcomes = []
    for relabel in (False, True):
        if relabel:
            _label_test_split_with_tuned_predictions(project)
        for stage in ("pipeline.compress", "pipeline.export"):
            _stage(project, stage)
        outcomes.append(_outcome(project))
    return outcomes


def test_relabelled_test_split_changes_no_decision(runs):
    real, relabelled = runs
    before, after = real["compress"], relabelled["compress"]
    assert relabelled["widths"] == real["widths"]
    assert after["prune_ratio"] == before["prune_ratio"]
    tried = [(a["ratio"], a["within_budget"], a["same_widths_as"]) for a in before["attempts"]]
    assert [(a["ratio"], a["within_budget"], a["same_widths_as"]) for a in after["attempts"]] == (
        tried
    )
    verdicts = {v["name"]: (v["accepted"], v["reason"]) for v in before["variants"]}
    assert {v["name"]: (v["accepted"], v["reason"]) for v in after["variants"]} == verdicts
    exported = {e["name"]: (e["accepted"], e["parity"]) for e in real["manifest"]["variants"]}
    again = {e["name"]: (e["accepted"], e["parity"]) for e in relabelled["manifest"]["variants"]}
    assert again == exported
    assert (
        _recommend_timed_as(relabelled["manifest"]["variants"], real["manifest"]["variants"])
        == (real["manifest"]["recommended"])
    )


def test_only_the_reported_test_numbers_change(runs):
    real, relabelled = runs
    before, after = real["compress"], relabelled["compress"]
    for short in SHORT:
        assert after[f"{short}_val_accuracy"] == before[f"{short}_val_accuracy"]
    assert [v["val_difference"] for v in after["variants"]] == [
        v["val_difference"] for v in before["variants"]
    ]
    assert before["fp32_test_accuracy"] < after["fp32_test_accuracy"] == 1.0
    manifest = {e["name"]: e for e in relabelled["manifest"]["variants"]}
    assert manifest["fp32"]["test_accuracy"] == 1.0
    for e in real["manifest"]["variants"]:
        assert manifest[e["name"]]["val_accuracy"] == e["val_accuracy"]


def test_a_guard_that_read_the_test_split_would_have_decided_differently(runs):
    """The premise of the first test: with the real labels an accepted variant was within the
    budget on test too; on the relabelled test split it loses more than the budget there (it
    disagrees with the tuned model on some test image). Measured with these params: every pruned
    variant, and the old test-reading guard backed off to a smaller ratio."""
    real, relabelled = runs
    before, after = real["compress"], relabelled["compress"]
    flips = [
        short
        for short in SHORT[1:]
        if before[f"{short}_accepted"]
        and before["fp32_test_accuracy"] - before[f"{short}_test_accuracy"] <= BUDGET
        and after["fp32_test_accuracy"] - after[f"{short}_test_accuracy"] > BUDGET
    ]
    assert flips, "no variant would flip: retune PARAMS, or the first test proves nothing"
