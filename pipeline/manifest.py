"""What the export stage writes about its models: each file's metadata, the manifest, the flat
metrics (no decisions here: `pipeline.champion`, `pipeline.export_checks`).

- `model_metadata(spec, info, params)`: the `metadata_props` every exported file starts with.
  No run id and no timing in them: the same inputs give the same bytes, so the model registry
  (keyed by sha256) sees one file however often the stage runs.
- `build_manifest(variants, inputs, params, gpu, gpu_records)`: `exported_models/manifest.json`
  (`pipeline.manifest/3`): per variant (`MANIFEST_KEYS`), the recommendation and its rule, the
  data, the benchmark settings and machine, the compression path; the model card's only source.
- `export_metrics(manifest, batch)`: `reports/export.json`, flat per-variant numbers and the
  recommended variant's (`recommended_*`, the numbers `metrics/export.json` keeps).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import onnx_tools, paths
from pipeline.benchmarking import settings
from pipeline.champion import RULE
from pipeline.config import Params
from pipeline.files import git_commit
from pipeline.inference import METADATA_FORMAT
from pipeline.reporting import difference_metrics
from pipeline.variants import REFERENCE, VariantSpec


def model_metadata(spec: VariantSpec, info: dict, params: Params) -> dict:
    """Everything a user of the file needs (values other than strings are stored as JSON)."""
    return {
        "format": METADATA_FORMAT,
        "variant": spec.name,
        "precision": spec.precision,
        "classes": list(info["classes"]),
        "mean": list(info["mean"]),  # for information: the graph applies them itself
        "std": list(info["std"]),
        "input_shape": list(info["shape"]),  # one image: channels, height, width
        "input_layout": "NHWC",  # the graph input: batch x H x W x C, as images come in memory
        "input_dtype": "uint8",
        "input_name": onnx_tools.INPUT_NAME,
        "output_name": onnx_tools.OUTPUT_NAME,
        "preprocess": (
            "yours: to L (1 channel) or RGB (3), centre crop + bilinear resize to H x W, uint8 "
            "pixels batch x H x W x C; in the graph: /255, (x - mean) / std"
        ),
        "dataset": info["name"],
        "dataset_sha256": info["sha256"]["all"],
        "source_checkpoint": str(spec.checkpoint),
        "params_hash": params.hash(),
        "git_commit": git_commit(),
    }


def latency_keys(batch: int) -> tuple[str, ...]:
    """The default provider's numbers copied into each manifest entry and the metrics."""
    return (
        "latency_ms_p50_b1",
        "latency_ms_p95_b1",
        "latency_spread_ms",
        f"throughput_b{batch}",
    )


MANIFEST_KEYS = (
    "name", "path", "sha256", "size_bytes", "params", "macs", "val_accuracy", "val_difference",
    "test_accuracy",
    "latency_ms_p50_b1", "latency_ms_p95_b1", "latency_spread_ms", "throughput_b{batch}",
    "provider", "parity", "accepted", "recommended", "reason", "precision", "latency",
)  # fmt: skip
DATA_KEYS = ("input_name", "input_layout", "input_shape", "output_name", "preprocess")


def _value(text: str):
    """A metadata value: JSON when it parses (lists, numbers), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _data(inputs, first_metadata: dict) -> dict:
    """The dataset, its split sizes and the preprocessing (as the files' metadata state it)."""
    info = inputs.info
    described = {k: _value(first_metadata[k]) for k in DATA_KEYS}
    keep = ("name", "classes", "counts", "mean", "std")
    return {k: info[k] for k in keep} | described


def compression_path(compress: dict, blobs: dict[Path, dict]) -> dict:
    """The compress stage's numbers (reports/compress.json), the widths before and after."""
    keys = ("prune_ratio", "prune_ratio_requested", "max_accuracy_drop", "macs_before")
    keys += ("macs_after", "params_before", "params_after")
    tuned, pruned = blobs.get(paths.TUNED_CKPT, {}), blobs.get(paths.PRUNED_CKPT, {})
    return {k: compress.get(k) for k in keys} | {
        "widths_before": tuned.get("arch", {}).get("options", {}).get("widths"),
        "pruned_layers": pruned.get("arch", {}).get("pruned", {}).get("layers", {}),
    }


def build_manifest(variants, inputs, params: Params, gpu: str, gpu_records) -> dict:
    batch = params.export.benchmark_batch
    keys = [k.format(batch=batch) for k in MANIFEST_KEYS]
    return {
        "format": "pipeline.manifest/3",
        "recommended": next(v.spec.name for v in variants if v.entry["recommended"]),
        "recommendation": RULE,
        "gpu": gpu,
        "gpu_checks": gpu_records,
        "benchmark_batch": batch,
        "benchmark": settings(params),
        "decided_on": "val: parity, GPU checks, accepted (with compress.json), recommended",
        "val_images": len(inputs.y["val"]),
        "test_images": len(inputs.y["test"]),  # scored once, after every choice
        "dataset": inputs.info["name"],
        "dataset_sha256": inputs.info["sha256"]["all"],
        "data": _data(inputs, onnx_tools.read_metadata(variants[0].proto)),
        "compression": inputs.compression,
        "git_commit": git_commit(),
        "params_hash": params.hash(),
        "variants": [{k: v.entry[k] for k in keys} for v in variants],
    }


def export_metrics(manifest: dict, batch: int) -> dict:
    """reports/export.json: flat per-variant numbers, the GPU status, the recommendation, and
    the recommended variant's numbers as `recommended_*` (what metrics/export.json keeps)."""
    metrics = {"gpu": manifest["gpu"], "recommended": manifest["recommended"]}
    chosen = next(e for e in manifest["variants"] if e["name"] == manifest["recommended"])
    for key in ("val_accuracy", "test_accuracy", "latency_ms_p50_b1", "size_bytes"):
        metrics[f"recommended_{key}"] = chosen[key]
    for e in manifest["variants"]:
        name = e["name"]
        metrics[f"{name}_val_accuracy"] = e["val_accuracy"]
        metrics[f"{name}_test_accuracy"] = e["test_accuracy"]
        if name != REFERENCE:
            metrics |= difference_metrics(name, e["val_difference"])
        for key in latency_keys(batch):
            metrics[f"{name}_{key}"] = e[key]
        metrics[f"{name}_size_bytes"] = e["size_bytes"]
        metrics[f"{name}_provider"] = e["provider"]
        metrics[f"{name}_parity_max_abs_diff"] = e["parity"]["max_abs_diff"]
        metrics[f"{name}_parity_top1_agreement"] = e["parity"]["top1_agreement"]
        metrics[f"{name}_accepted"] = e["accepted"]
    metrics["gpu_checks"] = manifest["gpu_checks"]
    return metrics
