"""`exported_models/MODEL_CARD.md`: the export manifest written for a reader, and the same text
as the description of the registered champion version in MLflow.

`model_card(manifest)` reads only the manifest (`pipeline.manifest.build_manifest`), so every
number in the card is one of the manifest's: the data and its split sizes, the classes, the
preprocessing, each variant's val / test accuracy with the paired val difference to the dense
fp32 model and its 95 % interval, size, latency with its spread and the machine that timed it,
the compression path, intended use and limitations.
"""

from __future__ import annotations

from pipeline.reporting import describe_difference
from pipeline.variants import BY_NAME, REFERENCE


def _variants_table(manifest: dict) -> list[str]:
    lines = [
        f"| variant | what | val acc | val vs {REFERENCE}, points [95% CI] | test acc "
        "| size (bytes) | params | MACs | p50 b1 (ms) | spread (ms) | p95 b1 (ms) | provider "
        "| accepted | recommended |",
        "|" + " --- |" * 14,
    ]
    for e in manifest["variants"]:
        spec = BY_NAME.get(e["name"])
        verdict = "yes" if e["accepted"] else f"no: {e['reason']}"
        lines.append(
            f"| {e['name']} | {spec.label if spec else e['precision']} | "
            f"{e['val_accuracy']:.4f} | {describe_difference(e['val_difference'])} | "
            f"{e['test_accuracy']:.4f} | {e['size_bytes']} | {e['params']} | {e['macs']} | "
            f"{e['latency_ms_p50_b1']:.4f} | {e['latency_spread_ms']:.4f} | "
            f"{e['latency_ms_p95_b1']:.4f} | {e['provider']} | {verdict} | "
            f"{'**yes**' if e['recommended'] else ''} |"
        )
    return lines


NEEDED = ("widths_before", "params_before", "macs_before", "prune_ratio", "prune_ratio_requested")
NEEDED += ("max_accuracy_drop", "params_after", "macs_after")


def _compression(c: dict) -> list[str]:
    layers = ", ".join(f"{layer} {widths}" for layer, widths in c.get("pruned_layers", {}).items())
    if any(c.get(k) is None for k in NEEDED):  # inputs built without reports/compress.json
        return [
            f"1. The tuned model (`{REFERENCE}`), pruned and fine-tuned (`pruned_fp32`); the "
            "compress stage's ratio, widths and sizes were not recorded for this export.",
            "2. From the pruned fp32 model: `int8` (ONNX Runtime static QDQ) and `fp16`.",
        ]
    return [
        f"1. The tuned model (widths {c['widths_before']}): {c['params_before']} parameters, "
        f"{c['macs_before']} MACs per image: variant `{REFERENCE}`.",
        f"2. Structured pruning at ratio {c['prune_ratio']:g} (requested "
        f"{c['prune_ratio_requested']:g}; budget: at most {100 * c['max_accuracy_drop']:.2f} "
        f"points lost on val), then fine-tuning: {c['params_after']} parameters, "
        f"{c['macs_after']} MACs per image ({layers or 'no layer narrower'}): `pruned_fp32`.",
        "3. From the pruned fp32 model: `int8` (ONNX Runtime static QDQ, per-channel weights, "
        "calibrated on training images) and `fp16` (fp16 weights and compute).",
    ]


def model_card(manifest: dict) -> str:
    """The model card (Markdown) of one export, from its manifest."""
    data, bench = manifest["data"], manifest["benchmark"]
    counts = data["counts"]
    recommended = manifest["recommended"]
    lines = [
        f"# Model card: {data['name']} classifier",
        "",
        f"Exported from git commit `{manifest['git_commit']}` (params hash "
        f"`{manifest['params_hash']}`); `manifest.json` beside this file holds the same numbers. "
        f"Recommended variant: **{recommended}** (`model_{recommended}.onnx`).",
        "",
        "## Data",
        "",
        f"- Dataset `{data['name']}` (sha256 `{manifest['dataset_sha256']}`), "
        f"{len(data['classes'])} classes: {', '.join(map(str, data['classes']))}.",
        f"- Splits: train {counts['train']} images, val {counts['val']} (every check and "
        f"choice), test {counts['test']} (scored once, after every choice, for this report).",
        "",
        "## Input and preprocessing",
        "",
        f"- Input `{data['input_name']}`, layout {data['input_layout']}, shape "
        f"{data['input_shape']}; output `{data['output_name']}` ({len(data['classes'])} logits).",
        f"- Preprocessing: {data['preprocess']}; mean {data['mean']}, std {data['std']}.",
        "- Every file carries this in its ONNX `metadata_props`.",
        "",
        "## Variants",
        "",
        *_variants_table(manifest),
        "",
        f"Val difference: paired, on the same {manifest['val_images']} val images, with a 95 % "
        f"paired-bootstrap interval and the number of images on which the two disagree.",
        "",
        "## Latency: how and where",
        "",
        f"- Machine: {bench['cpu']} ({bench['cpu_count']} logical CPUs), {bench['system']}, "
        f"ONNX Runtime {bench['onnxruntime']}; GPU: {manifest['gpu']}.",
        f"- Batch 1 on val images, {bench['rounds']} interleaved rounds of "
        f"{bench['runs_per_round']} runs per variant (and at least {bench['min_round_s'] * 1e3:g} "
        f"ms) after {bench['warmup_runs']} warm-up runs; "
        f"CPU sessions pinned to {bench['cpu_threads']} intra-op thread(s). p50 is the median of "
        f"the round medians, spread their range without the highest and the lowest.",
        f"- Recommendation: {manifest['recommendation']}.",
        "",
        "## Compression path",
        "",
        *_compression(manifest["compression"]),
        "",
        "## Intended use",
        "",
        f"Classifying single {data['name']} images like those of the training data (same "
        "classes, same kind of capture), one at a time or in batches, on a CPU or GPU with "
        "ONNX Runtime; `pipeline predict` or `pipeline.inference.OnnxClassifier` apply the "
        "preprocessing above.",
        "",
        "## Limitations",
        "",
        f"- Accuracy was measured on {counts['val']} val and {counts['test']} test images of one "
        f"dataset: one image is {100 / counts['val']:.2f} points on val; the intervals above "
        "are the honest precision.",
        "- Images unlike the training data (other classes, other capture, other sizes before "
        "the resize) are outside what was measured; the model always answers one of its classes.",
        "- Latency holds for the machine above, at batch 1, with the threads stated; another "
        "machine or load needs its own measurement (`pipeline export`).",
        "- Variants not accepted must not be shipped; see their reason above.",
    ]
    return "\n".join(lines) + "\n"
