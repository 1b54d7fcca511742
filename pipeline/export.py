"""export stage: ONNX models that explain themselves, checked against PyTorch and the GPU, timed.

Reads: params.yaml (`device`, `export`, `tracking`), `data/prepared/` (val and test splits),
`models/tuned.pt`, `models/compressed/` (`pruned.pt` and the four ONNX files),
`metrics/compress.json` (which variants are accepted, their params and MACs).
Writes: `exported_models/model_{fp32,pruned_fp32,int8,fp16}.onnx`, `exported_models/manifest.json`,
`metrics/export.json`, `plots/export_latency.png`; one MLflow run with the manifest, the plot and
every model logged as an MLflow ONNX model, the recommended one registered as a new version of
`export.registered_model` with the alias `champion`.
Run: `dvc repro export`, `pipeline export` or `python -m pipeline.export`.

1. The four models are the compress stage's files (the ones it measured and judged), each given
   `metadata_props` (see `model_metadata`) and passing the full `onnx.checker`. With
   `export.opset` set, the two fp32 models are exported again from their checkpoints at that
   opset (int8 and fp16 keep the compress stage's).
Every check and choice reads the val split (parity flips `accepted`); the test split is scored
once, after them, for the report (`test_accuracy` beside `val_accuracy` in the manifest).

2. Parity (`pipeline.export_checks`) on the val split with ONNX Runtime on the CPU, against
   the checkpoints: fp32 logits within `export.parity_atol` of PyTorch's (dense: tuned.pt,
   pruned: pruned.pt), int8 / fp16 top-1 agreeing with the pruned PyTorch model on at least
   `export.min_top1_agreement` of the images. A failure stops the stage, before any file is
   written, with a table of what disagreed (a variant the compress stage rejected is only
   reported: it is never shipped as accepted).
3. GPU check, only when `torch.cuda.is_available()` and `device` is not `cpu`: every variant
   on each GPU provider that starts (TensorRT when its libraries load, CUDA), compared with its
   CPU outputs on val. Without a GPU, `metrics/export.json` says `"gpu": "not available"` and
   the stage passes unless `export.require_gpu` is true.
4. Latency per variant and provider (`onnx_tools.benchmark`, on val images). The recommended
   variant is the fastest accepted one (batch-1 p50 on the default provider); variants within
   `LATENCY_TIE` of the fastest count as tied, and the smallest file wins a tie. The manifest
   also carries each variant's paired val difference to fp32 (`pipeline.stats`).
5. Test accuracy of every variant (ONNX Runtime CPU), once, written into its metadata last.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from pipeline import onnx_tools, paths
from pipeline.checkpoint import load_checkpoint
from pipeline.config import Params, load_params
from pipeline.data import DeviceData, load_prepared
from pipeline.errors import DataError, StageFailed, stage_entry
from pipeline.export_checks import (
    check_parity,
    failure_table,
    gpu_check,
    gpu_status,
    summarize_gpu,
)
from pipeline.files import git_commit, read_json, sha256_file, write_json
from pipeline.inference import METADATA_FORMAT
from pipeline.plots import export_latency_plot
from pipeline.reporting import difference_metrics, manifest_table, versus_reference
from pipeline.tracking import stage_run

COMPRESS_METRICS = paths.METRICS_DIR / "compress.json"
CPU = "CPUExecutionProvider"
LATENCY_TIE = 0.05  # relative batch-1 p50 difference treated as a tie (timer noise)


@dataclass(frozen=True)
class VariantSpec:
    name: str  # exported as exported_models/model_<name>.onnx
    source: Path  # the compress stage's ONNX file (and its entry in compress.json)
    checkpoint: Path  # the PyTorch model the ONNX model must agree with
    precision: str  # fp32 | int8 | fp16


VARIANTS = (
    VariantSpec("fp32", paths.DENSE_FP32_ONNX, paths.TUNED_CKPT, "fp32"),
    VariantSpec("pruned_fp32", paths.PRUNED_FP32_ONNX, paths.PRUNED_CKPT, "fp32"),
    VariantSpec("int8", paths.PRUNED_INT8_ONNX, paths.PRUNED_CKPT, "int8"),
    VariantSpec("fp16", paths.PRUNED_FP16_ONNX, paths.PRUNED_CKPT, "fp16"),
)


@dataclass
class ExportInputs:
    info: dict  # dataset.json
    x: dict[str, np.ndarray]  # "val" (every check) and "test" (reported once): float32 NCHW
    y: dict[str, np.ndarray]
    models: dict[Path, nn.Module]  # checkpoint path -> PyTorch model (CPU, eval)
    compressed: dict[Path, onnx.ModelProto]  # the compress stage's ONNX files
    compress_variants: dict[str, dict]  # ONNX file name -> its entry in compress.json


@dataclass
class ExportedVariant:
    spec: VariantSpec
    proto: onnx.ModelProto  # with metadata, checked
    entry: dict  # the manifest entry
    logits: np.ndarray = field(repr=False)  # CPU logits on the val split
    sessions: dict = field(default_factory=dict, repr=False)  # provider -> InferenceSession


@dataclass
class ExportResult:
    variants: list[ExportedVariant]
    manifest: dict
    metrics: dict

    @property
    def recommended(self) -> ExportedVariant:
        return next(v for v in self.variants if v.entry["recommended"])


def load_inputs(variants: tuple[VariantSpec, ...] = VARIANTS) -> ExportInputs:
    """Read the val and test splits, the checkpoints, the compressed ONNX files, compress.json."""
    prepared = load_prepared(paths.PREPARED_DIR)
    data = DeviceData(prepared, torch.device("cpu"))
    models = {}
    for ckpt in dict.fromkeys(s.checkpoint for s in variants):
        models[ckpt], _ = load_checkpoint(ckpt)
    compressed = {}
    for spec in variants:
        if not spec.source.is_file():
            raise DataError(f"{spec.source}: not found; run the compress stage first")
        compressed[spec.source] = onnx.load(str(spec.source))
    if not COMPRESS_METRICS.is_file():
        raise DataError(f"{COMPRESS_METRICS}: not found; run the compress stage first")
    entries = read_json(COMPRESS_METRICS).get("variants", [])
    return ExportInputs(
        prepared.info,
        {split: data.x[split].numpy() for split in ("val", "test")},
        {split: data.y[split].numpy() for split in ("val", "test")},
        models,
        compressed,
        {Path(e["path"]).name: e for e in entries},
    )


def torch_logits(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    with torch.no_grad():
        chunks = [
            model(torch.from_numpy(x[i : i + batch_size])).float().numpy()
            for i in range(0, len(x), batch_size)
        ]
    return np.concatenate(chunks)


def build_proto(spec: VariantSpec, inputs: ExportInputs, opset: int | None) -> onnx.ModelProto:
    """A copy of the compress stage's model; fp32 exported again when `opset` is set."""
    if spec.precision != "fp32" or opset is None:
        proto = onnx.ModelProto()
        proto.CopyFrom(inputs.compressed[spec.source])
        return proto
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        shape = tuple(inputs.info["shape"])
        return onnx_tools.export_onnx(
            inputs.models[spec.checkpoint], Path(tmp) / "model.onnx", shape, opset=opset
        )


def model_metadata(spec: VariantSpec, inputs: ExportInputs, params: Params, run_id: str) -> dict:
    """Everything a user of the file needs (values other than strings are stored as JSON)."""
    info = inputs.info
    return {
        "format": METADATA_FORMAT,
        "variant": spec.name,
        "precision": spec.precision,
        "classes": list(info["classes"]),
        "mean": list(info["mean"]),
        "std": list(info["std"]),
        "input_shape": list(info["shape"]),
        "input_layout": "NCHW",
        "input_name": onnx_tools.INPUT_NAME,
        "output_name": onnx_tools.OUTPUT_NAME,
        "preprocess": "to L or RGB, centre crop + bilinear resize to HxW, /255, (x - mean) / std",
        "dataset": info["name"],
        "dataset_sha256": info["sha256"]["all"],
        "source_checkpoint": str(spec.checkpoint),
        "params_hash": params.hash(),
        "git_commit": git_commit(),
        "source_run": run_id or "untracked",
    }


def evaluate_variant(
    spec: VariantSpec, inputs: ExportInputs, params: Params, reference: np.ndarray, run_id: str
) -> ExportedVariant:
    """Build and annotate one variant, score it on val on the CPU, check parity against PyTorch
    there (`reference`: the checkpoint's logits on val)."""
    compress_entry = inputs.compress_variants.get(spec.source.name)
    if compress_entry is None:
        raise DataError(
            f"{COMPRESS_METRICS}: no entry for {spec.source}; re-run the compress stage"
        )
    proto = build_proto(spec, inputs, params.export.opset)
    onnx_tools.write_metadata(proto, model_metadata(spec, inputs, params, run_id))
    session, _ = onnx_tools.session_for(proto.SerializeToString(), CPU)
    logits = onnx_tools.run_logits(session, inputs.x["val"])
    entry = {
        "name": spec.name,
        "path": str(paths.exported_model(spec.name)),
        "precision": spec.precision,
        "params": int(compress_entry.get("params") or 0),
        "macs": int(compress_entry.get("macs") or 0),
        "val_accuracy": round(float((logits.argmax(1) == inputs.y["val"]).mean()), 6),
        "parity": check_parity(
            spec.precision, logits, reference, params.export, str(spec.checkpoint)
        ),
        "compress_accepted": bool(compress_entry.get("accepted")),
        "compress_reason": str(compress_entry.get("reason", "")),
    }
    return ExportedVariant(spec, proto, entry, logits, {CPU: session})


def must_agree(variant: ExportedVariant) -> bool:
    """A parity failure stops the stage for fp32 (an export bug) and for accepted variants."""
    return variant.spec.precision == "fp32" or variant.entry["compress_accepted"]


def check_gpus(
    variants: list[ExportedVariant], x: np.ndarray, params: Params, providers: list[str]
) -> tuple[list[dict], list[str]]:
    """Every variant on each GPU provider vs its CPU logits; (records, providers that ran)."""
    records = []
    for v in variants:
        checks, sessions = gpu_check(
            v.spec.name, v.proto.SerializeToString(), x, v.logits, params.export, providers
        )
        records += checks
        v.sessions.update(sessions)
    ran = [p for p in providers if any(r["ran"] and r["provider"] == p for r in records)]
    return records, ran


def benchmark_variant(variant: ExportedVariant, x: np.ndarray, params: Params) -> None:
    cfg = params.export
    variant.entry["latency"] = {
        provider: {
            k: round(v, 4)
            for k, v in onnx_tools.benchmark(
                session, x, cfg.benchmark_batch, cfg.warmup_runs, cfg.latency_runs
            ).items()
        }
        for provider, session in variant.sessions.items()
    }


def finish_variant(variant: ExportedVariant, gpu_ran: list[str], batch: int) -> None:
    """Accepted flag, the default provider's numbers, the metadata measured on val, size."""
    entry = variant.entry
    provider = next((p for p in gpu_ran if p in entry["latency"]), CPU)
    passed = entry["parity"]["passed"]
    entry.update(
        provider=provider,
        **{k: entry["latency"][provider][k] for k in latency_keys(batch)},
        accepted=entry["compress_accepted"] and passed,
        reason=entry["compress_reason"]
        if passed or not entry["compress_accepted"]
        else "failed the parity check",
    )
    measured = {
        "val_accuracy": entry["val_accuracy"],
        "val_images": len(variant.logits),
        "params": entry["params"],
        "macs": entry["macs"],
        "accepted": entry["accepted"],
        "parity": {k: entry["parity"][k] for k in ("passed", "max_abs_diff", "top1_agreement")},
    }
    onnx_tools.write_metadata(variant.proto, measured)
    entry["size_bytes"] = variant.proto.ByteSize()  # what `recommend` compares


def report_test(variant: ExportedVariant, x_test: np.ndarray, y_test: np.ndarray) -> None:
    """After every choice: the test accuracy, once, into the entry and the file's metadata, then
    checker, sha256 and final size. Written at a fixed width, so every file grows by the same
    bytes and the size order `recommend` read stands."""
    logits = onnx_tools.run_logits(variant.sessions[CPU], x_test)
    accuracy = float((logits.argmax(1) == y_test).mean())
    variant.entry["test_accuracy"] = round(accuracy, 6)
    test = {"test_accuracy": f"{accuracy:.6f}", "test_images": len(y_test)}
    onnx_tools.write_metadata(variant.proto, test)
    onnx.checker.check_model(variant.proto, full_check=True)
    data = variant.proto.SerializeToString()
    variant.entry.update(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def latency_keys(batch: int) -> tuple[str, ...]:
    return ("latency_ms_p50_b1", "latency_ms_p95_b1", f"throughput_b{batch}")


def recommend(entries: list[dict]) -> str:
    """The fastest accepted variant (batch-1 p50); within LATENCY_TIE, the smallest file."""
    accepted = [e for e in entries if e["accepted"]]
    if not accepted:
        raise StageFailed(f"no variant is accepted; see {COMPRESS_METRICS} and the parity checks")
    fastest = min(e["latency_ms_p50_b1"] for e in accepted)
    tied = [e for e in accepted if e["latency_ms_p50_b1"] <= fastest * (1 + LATENCY_TIE)]
    return min(tied, key=lambda e: (e["size_bytes"], e["latency_ms_p50_b1"]))["name"]


def run(params: Params, inputs: ExportInputs, run_id: str = "") -> ExportResult:
    """Export, check and time every variant on val, then score test once; no file output.

    Raises StageFailed with a table when a parity or GPU check fails, or when
    `export.require_gpu` is true and no GPU provider runs.
    """
    status, providers = gpu_status(params)
    x_val, y_val = inputs.x["val"], inputs.y["val"]
    references = {c: torch_logits(m, x_val) for c, m in inputs.models.items()}
    variants = [
        evaluate_variant(s, inputs, params, references[s.checkpoint], run_id) for s in VARIANTS
    ]
    correct = {v.spec.name: v.logits.argmax(1) == y_val for v in variants}
    differences = versus_reference(correct, VARIANTS[0].name)
    failures = [
        (v.spec.name, "ONNX Runtime CPU vs PyTorch", v.entry["parity"])
        for v in variants
        if must_agree(v) and not v.entry["parity"]["passed"]
    ]
    gpu_records, gpu_ran = check_gpus(variants, x_val, params, providers)
    failures += [
        (r["variant"], f"{r['provider']} vs CPU", r)
        for r in gpu_records
        if r["ran"] and not r["passed"]
    ]
    if failures:
        raise StageFailed("parity check failed\n" + failure_table(failures, len(y_val)))
    gpu = summarize_gpu(status, providers, gpu_ran, gpu_records, params)
    batch = params.export.benchmark_batch
    for v in variants:
        v.entry["val_difference"] = differences[v.spec.name].record()
        benchmark_variant(v, x_val[:256], params)
        finish_variant(v, gpu_ran, batch)
    best = recommend([v.entry for v in variants])
    for v in variants:
        v.entry["recommended"] = v.spec.name == best
        report_test(v, inputs.x["test"], inputs.y["test"])  # after every choice, once
    manifest = build_manifest(variants, inputs, params, gpu, gpu_records)
    return ExportResult(variants, manifest, export_metrics(manifest, batch))


MANIFEST_KEYS = (
    "name", "path", "sha256", "size_bytes", "params", "macs", "val_accuracy", "val_difference",
    "test_accuracy",
    "latency_ms_p50_b1", "latency_ms_p95_b1", "throughput_b{batch}", "provider", "parity",
    "accepted", "recommended", "reason", "precision", "latency",
)  # fmt: skip


def build_manifest(variants, inputs: ExportInputs, params: Params, gpu: str, gpu_records) -> dict:
    batch = params.export.benchmark_batch
    keys = [k.format(batch=batch) for k in MANIFEST_KEYS]
    return {
        "format": "pipeline.manifest/2",
        "recommended": next(v.spec.name for v in variants if v.entry["recommended"]),
        "recommendation": (
            f"the fastest accepted variant by batch-1 p50 latency on its default provider; "
            f"within {LATENCY_TIE:.0%} counts as a tie, won by the smaller file"
        ),
        "gpu": gpu,
        "gpu_checks": gpu_records,
        "benchmark_batch": batch,
        "decided_on": "val: parity, GPU checks, accepted (with compress.json), recommended",
        "val_images": len(inputs.y["val"]),
        "test_images": len(inputs.y["test"]),  # scored once, after every choice
        "dataset": inputs.info["name"],
        "dataset_sha256": inputs.info["sha256"]["all"],
        "git_commit": git_commit(),
        "params_hash": params.hash(),
        "variants": [{k: v.entry[k] for k in keys} for v in variants],
    }


def export_metrics(manifest: dict, batch: int) -> dict:
    """metrics/export.json: flat per-variant numbers, the GPU status, the recommendation."""
    metrics = {"gpu": manifest["gpu"], "recommended": manifest["recommended"]}
    for e in manifest["variants"]:
        name = e["name"]
        metrics[f"{name}_val_accuracy"] = e["val_accuracy"]
        metrics[f"{name}_test_accuracy"] = e["test_accuracy"]
        if name != VARIANTS[0].name:  # the reference
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


def write_outputs(result: ExportResult) -> None:
    """The ONNX files (atomic, already checked), manifest.json, metrics/export.json, the plot."""
    for v in result.variants:
        path = paths.exported_model(v.spec.name)
        onnx_tools.save_model(v.proto, path, check=False)
        if sha256_file(path) != v.entry["sha256"]:  # the manifest must describe the file
            raise StageFailed(f"{path}: written bytes differ from the checked model")
    write_json(paths.EXPORT_MANIFEST, result.manifest)
    write_json(paths.EXPORT_METRICS, result.metrics)
    export_latency_plot(result.manifest, paths.EXPORT_PLOT)


def log_to_mlflow(tracker, result: ExportResult, params: Params) -> str | None:
    """Metrics, manifest, plot, every model; the recommended one registered as `champion`."""
    tracker.log_metrics(result.metrics)
    tracker.set_tags(
        {"recommended": result.manifest["recommended"], "gpu": result.manifest["gpu"]}
    )
    tracker.log_artifact(paths.EXPORT_MANIFEST, "export")
    tracker.log_artifact(paths.EXPORT_PLOT, "plots")
    registered, version = params.export.registered_model, None
    for v in result.variants:
        providers = onnx_tools.providers("auto" if v.entry["provider"] != CPU else "cpu")
        logged = tracker.log_onnx_model(
            v.proto,
            f"model_{v.spec.name}",
            registered_model=registered if v.entry["recommended"] else None,
            providers=providers,
        )
        version = logged or version
    if version is not None:
        e = result.recommended.entry
        keys = ("name", "val_accuracy", "test_accuracy", "sha256", "latency_ms_p50_b1", "provider")
        tags = {k: e[k] for k in keys}
        tracker.set_model_alias(registered, "champion", version, tags)
    return version


@stage_entry
def main(argv: list[str] | None = None) -> None:
    params = load_params(paths.PARAMS)
    inputs = load_inputs()
    with stage_run("export", params, inputs.info["sha256"]["all"]) as tracker:
        tracker.log_params({"export": dataclasses.asdict(params.export), "device": params.device})
        result = run(params, inputs, run_id=tracker.run_id or "")
        write_outputs(result)
        version = log_to_mlflow(tracker, result, params)
    print(manifest_table(result.manifest), file=sys.stderr)
    registered = f", registered as {params.export.registered_model} v{version}" if version else ""
    print(
        f"export: {len(result.variants)} models in {paths.EXPORT_DIR}/, GPU: "
        f"{result.manifest['gpu']}; recommended {result.manifest['recommended']}{registered}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
