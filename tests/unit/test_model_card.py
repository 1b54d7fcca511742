"""The model card from a synthetic manifest: its numbers are the manifest's, nothing else."""

from __future__ import annotations

from pipeline.model_card import model_card


def _entry(name, val, test, p50, spread, recommended=False):
    return {
        "name": name,
        "precision": "fp32",
        "val_accuracy": val,
        "val_difference": {"difference": -0.0037, "low": -0.0111, "high": 0.0037, "n_disagree": 3},
        "test_accuracy": test,
        "size_bytes": 1234,
        "params": 99,
        "macs": 999,
        "latency_ms_p50_b1": p50,
        "latency_spread_ms": spread,
        "latency_ms_p95_b1": 2 * p50,
        "provider": "CPUExecutionProvider",
        "accepted": True,
        "reason": "",
        "recommended": recommended,
    }


MANIFEST = {
    "git_commit": "abc",
    "params_hash": "h",
    "dataset_sha256": "d",
    "recommended": "int8",
    "recommendation": "the rule",
    "gpu": "not available",
    "val_images": 270,
    "data": {
        "name": "digits",
        "classes": ["0", "1"],
        "counts": {"train": 1167, "val": 270, "test": 360},
        "mean": [0.3],
        "std": [0.4],
        "input_name": "input",
        "input_layout": "NHWC",
        "input_shape": [1, 8, 8],
        "output_name": "logits",
        "preprocess": "resize",
    },
    "benchmark": {
        "cpu": "CPU X",
        "cpu_count": 2,
        "system": "Linux",
        "onnxruntime": "1.0",
        "cpu_threads": 1,
        "rounds": 5,
        "runs_per_round": 20,
        "min_round_s": 0.02,
        "warmup_runs": 10,
    },
    "compression": {
        "widths_before": [16, 32],
        "params_before": 5178,
        "macs_before": 51780,
        "prune_ratio": 0.25,
        "prune_ratio_requested": 0.5,
        "max_accuracy_drop": 0.01,
        "params_after": 1442,
        "macs_after": 14420,
        "pruned_layers": {"features.0.0": {"out_channels": 8}},
    },
    "variants": [
        _entry("fp32", 0.98519, 0.97222, 0.0114, 0.0103),
        _entry("int8", 0.95926, 0.96944, 0.0132, 0.0036, recommended=True),
    ],
}


def test_the_card_states_each_variants_numbers_and_the_compression_path():
    card = model_card(MANIFEST)
    assert (
        "| int8 | pruned, int8 (static QDQ) | 0.9593 | -0.37 [-1.11, +0.37] (3 differ) | 0.9694 "
        "| 1234 | 99 | 999 | 0.0132 | 0.0036 | 0.0264 | CPUExecutionProvider | yes | **yes** |"
    ) in card
    assert "| fp32 | tuned model, fp32 | 0.9852 |" in card and card.count("**yes**") == 1
    assert "Splits: train 1167 images, val 270 (every check and choice), test 360" in card
    assert "2 classes: 0, 1." in card and "Input `input`, layout NHWC, shape [1, 8, 8]" in card
    assert "Machine: CPU X (2 logical CPUs), Linux, ONNX Runtime 1.0; GPU: not available" in card
    assert (
        "5 interleaved rounds of 20 runs per variant (and at least 20 ms) after 10 warm-up" in card
    )
    assert "pinned to 1 intra-op thread(s)" in card
    assert "The tuned model (widths [16, 32]): 5178 parameters, 51780 MACs per image" in card
    assert "ratio 0.25 (requested 0.5; budget: at most 1.00 points lost on val)" in card
    assert "1442 parameters, 14420 MACs per image (features.0.0 {'out_channels': 8})" in card
    assert "one image is 0.37 points on val" in card


def test_a_manifest_without_the_compress_numbers_says_they_were_not_recorded():
    card = model_card(MANIFEST | {"compression": {}})
    assert "ratio, widths and sizes were not recorded" in card
    assert "| int8 | pruned, int8 (static QDQ) | 0.9593 |" in card
