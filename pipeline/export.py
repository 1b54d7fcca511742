"""export stage: ONNX models that explain themselves, checked against PyTorch and the GPU, timed.

Reads: params.yaml (`device`, `export`, `tracking`), `data/prepared/` (val and test splits),
`models/tuned.pt`, `models/compressed/` (`pruned.pt` and the four ONNX files),
`reports/compress.json` (which variants are accepted, their params and MACs).
Writes: `exported_models/model_{fp32,pruned_fp32,int8,fp16}.onnx`, `exported_models/manifest.json`,
`metrics/export.json` (the recommended variant's test accuracy, latency and size),
`reports/export.json` (every variant's numbers, the GPU status), `plots/export_latency.png`,
`exported_models/MODEL_CARD.md`; one MLflow run with the manifest, the card, the plot and every
model (MLflow ONNX models); the registered model `export.registered_model` (see 4).
Run: `dvc repro export`, `pipeline export` or `python -m pipeline.export`.

1. The four models are the compress stage's files (the ones it measured and judged), each given
   `metadata_props` (see `model_metadata`) and passing the full `onnx.checker`. With
   `export.opset` set, the two fp32 models are exported again from their checkpoints at that
   opset (int8 and fp16 keep the compress stage's).
Every check and choice reads the val split (parity flips `accepted`); the test split is scored
once, after them, for the report (`test_accuracy` beside `val_accuracy` in the manifest).

2. Parity (`pipeline.export_checks`) on the val split with ONNX Runtime on the CPU (fed the
   uint8 NHWC pixels every exported graph takes and normalises itself), against the
   checkpoints (fed the same images normalised by `DeviceData`): fp32 logits within
   `export.parity_atol` of PyTorch's (dense: tuned.pt, pruned: pruned.pt), int8 / fp16 top-1
   agreeing with the pruned PyTorch model on at least `export.min_top1_agreement` of the
   images. An fp32 failure (an export bug) stops the stage, before any file is written, with
   a table of what disagreed; an int8 / fp16 one (lossy by design) rejects that variant, with
   the measured agreement as its reason, and the stage goes on.
3. GPU check, only when `torch.cuda.is_available()` and `device` is not `cpu`: every variant
   on each GPU provider that starts (TensorRT when its libraries load, CUDA), compared with its
   CPU outputs on val. Without a GPU, `reports/export.json` says `"gpu": "not available"` and
   the stage passes unless `export.require_gpu` is true.
4. Latency (`pipeline.benchmarking`): the variants timed in interleaved rounds, CPU threads
   pinned; the recommendation and the registry's `champion` alias follow `pipeline.champion`
   (faster only beyond the measured spread; ties to the smaller file; the alias moves only
   for a variant 20 % faster than the champion, beyond noise; one registry version per file
   sha256).
5. Test accuracy of every variant (ONNX Runtime CPU), once, written into its metadata last;
   then `MODEL_CARD.md` (`pipeline.model_card`), also the champion version's description.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from pipeline import onnx_tools, paths
from pipeline.benchmarking import benchmark
from pipeline.champion import recommend, update_champion
from pipeline.checkpoint import load_checkpoint
from pipeline.config import Params, load_params
from pipeline.data import DeviceData, load_prepared
from pipeline.errors import DataError, StageFailed, stage_entry
from pipeline.export_checks import failure_table, gpu_status, summarize_gpu
from pipeline.export_variant import (
    COMPRESS_REPORT,
    CPU,
    ExportedVariant,
    check_gpus,
    evaluate_variant,
    finish_variant,
    must_agree,
    report_test,
    torch_logits,
)
from pipeline.files import read_json, sha256_file, write_json, write_text
from pipeline.manifest import build_manifest, compression_path, export_metrics
from pipeline.model_card import model_card
from pipeline.plots import export_latency_plot
from pipeline.reporting import manifest_table, versus_reference
from pipeline.results import write_results
from pipeline.tracking import stage_run
from pipeline.variants import REFERENCE, VARIANTS, VariantSpec

# metrics/export.json: the recommended variant's test accuracy, latency and file size (which
# variant it is and every variant's numbers: reports/export.json)
METRIC_KEYS = {
    "test_accuracy": "recommended_test_accuracy",
    "latency_ms_p50_b1": "recommended_latency_ms_p50_b1",
    "size_bytes": "recommended_size_bytes",
}


@dataclass
class ExportInputs:
    info: dict  # dataset.json
    x: dict[str, np.ndarray]  # "val" (every check) and "test" (reported once): float32 NCHW
    y: dict[str, np.ndarray]
    models: dict[Path, nn.Module]  # checkpoint path -> PyTorch model (CPU, eval)
    compressed: dict[Path, onnx.ModelProto]  # the compress stage's ONNX files
    compress_variants: dict[str, dict]  # ONNX file name -> its entry in compress.json
    # the images of `x` as the ONNX models take them (uint8 NHWC pixels; the graph normalises)
    pixels: dict[str, np.ndarray]
    compression: dict = field(default_factory=dict)  # tuned -> pruned, for the model card


@dataclass
class ExportOutcome:
    variants: list[ExportedVariant]
    manifest: dict
    metrics: dict
    card: str  # MODEL_CARD.md, also the registered champion version's description

    @property
    def recommended(self) -> ExportedVariant:
        return next(v for v in self.variants if v.entry["recommended"])


def load_inputs(variants: tuple[VariantSpec, ...] = VARIANTS) -> ExportInputs:
    """Read the val and test splits, the checkpoints, the compressed ONNX files, compress.json."""
    prepared = load_prepared(paths.PREPARED_DIR)
    data = DeviceData(prepared, torch.device("cpu"))
    models, blobs = {}, {}
    for ckpt in dict.fromkeys(s.checkpoint for s in variants):
        models[ckpt], blobs[ckpt] = load_checkpoint(ckpt)
    compressed = {}
    for spec in variants:
        if not spec.source.is_file():
            raise DataError(f"{spec.source}: not found; run the compress stage first")
        compressed[spec.source] = onnx.load(str(spec.source))
    if not COMPRESS_REPORT.is_file():
        raise DataError(f"{COMPRESS_REPORT}: not found; run the compress stage first")
    compress = read_json(COMPRESS_REPORT)
    entries = compress.get("variants", [])
    return ExportInputs(
        prepared.info,
        {split: data.x[split].numpy() for split in ("val", "test")},
        {split: data.y[split].numpy() for split in ("val", "test")},
        models,
        compressed,
        {Path(e["path"]).name: e for e in entries},
        {split: onnx_tools.pixels_nhwc(data.images[split]) for split in ("val", "test")},
        compression_path(compress, blobs),
    )


def run(params: Params, inputs: ExportInputs | None = None) -> ExportOutcome:
    """Export, check and time every variant on val, then score test once; no file output
    (`inputs`: `load_inputs()` when None). The metrics are `ExportOutcome.metrics`.

    Raises StageFailed with a table when an fp32 parity check or a GPU check fails, or when
    `export.require_gpu` is true and no GPU provider runs (an int8 / fp16 variant below
    `export.min_top1_agreement` is rejected instead: `export_variant.must_agree`).
    """
    status, providers = gpu_status(params)
    inputs = inputs or load_inputs()
    x_val, y_val = inputs.x["val"], inputs.y["val"]
    references = {c: torch_logits(m, x_val) for c, m in inputs.models.items()}
    variants = [evaluate_variant(s, inputs, params, references[s.checkpoint]) for s in VARIANTS]
    correct = {v.spec.name: v.logits.argmax(1) == y_val for v in variants}
    differences = versus_reference(correct, REFERENCE)
    failures = [
        (v.spec.name, "ONNX Runtime CPU vs PyTorch", v.entry["parity"])
        for v in variants
        if must_agree(v) and not v.entry["parity"]["passed"]
    ]
    gpu_records, gpu_ran = check_gpus(variants, inputs.pixels["val"], params, providers)
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
    benchmark(variants, inputs.pixels["val"][:256], params)  # interleaved: one shared noise
    for v in variants:
        finish_variant(v, gpu_ran, batch)
    best = recommend([v.entry for v in variants])
    for v in variants:
        v.entry["recommended"] = v.spec.name == best
        report_test(v, inputs.pixels["test"], inputs.y["test"])  # after every choice, once
    manifest = build_manifest(variants, inputs, params, gpu, gpu_records)
    card = model_card(manifest)
    return ExportOutcome(variants, manifest, export_metrics(manifest, batch), card)


def write_outputs(result: ExportOutcome) -> None:
    """The ONNX files (atomic, already checked), manifest.json, metrics/ and reports/export.json,
    the plot."""
    for v in result.variants:
        path = paths.exported_model(v.spec.name)
        onnx_tools.save_model(v.proto, path, check=False)
        if sha256_file(path) != v.entry["sha256"]:  # the manifest must describe the file
            raise StageFailed(f"{path}: written bytes differ from the checked model")
    write_json(paths.EXPORT_MANIFEST, result.manifest)
    write_text(paths.MODEL_CARD, result.card)
    write_results("export", result.metrics, METRIC_KEYS)
    export_latency_plot(result.manifest, paths.EXPORT_PLOT)


def log_to_mlflow(tracker, result: ExportOutcome, params: Params) -> tuple:
    """Metrics, manifest, card, plot, every model; the registry's champion updated by the rule
    of `pipeline.champion.update_champion`. Returns (champion version, moved, why)."""
    tracker.log_metrics(result.metrics)
    tracker.set_tags(
        {"recommended": result.manifest["recommended"], "gpu": result.manifest["gpu"]}
    )
    tracker.log_artifact(paths.EXPORT_MANIFEST, "export")
    tracker.log_artifact(paths.MODEL_CARD, "export")
    tracker.log_artifact(paths.EXPORT_PLOT, "plots")
    uris = {
        v.spec.name: tracker.log_onnx_model(
            v.proto,
            f"model_{v.spec.name}",
            providers=onnx_tools.providers("auto" if v.entry["provider"] != CPU else "cpu"),
        )
        for v in result.variants
    }
    recommended = result.manifest["recommended"]
    registered = params.export.registered_model
    return update_champion(tracker, registered, result.manifest, uris[recommended], result.card)


@stage_entry
def main(argv: list[str] | None = None) -> None:
    params = load_params(paths.PARAMS)
    inputs = load_inputs()
    with stage_run("export", params, inputs.info["sha256"]["all"]) as tracker:
        tracker.log_params({"export": dataclasses.asdict(params.export), "device": params.device})
        result = run(params, inputs)
        write_outputs(result)
        version, _, why = log_to_mlflow(tracker, result, params)
    print(manifest_table(result.manifest), file=sys.stderr)
    registered = params.export.registered_model
    champion = f"; {registered}@champion: v{version} ({why})" if version else ""
    print(
        f"export: {len(result.variants)} models in {paths.EXPORT_DIR}/, GPU: "
        f"{result.manifest['gpu']}; recommended {result.manifest['recommended']}{champion}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
