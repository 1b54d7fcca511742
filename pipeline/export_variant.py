"""One exported variant through the export stage's steps, in order (`pipeline.export.run`).

- `evaluate_variant`: a copy of the compress stage's file (`build_proto`; the fp32 ones
  exported again when `export.opset` is set), its metadata (`pipeline.manifest.model_metadata`),
  its val logits on the CPU and its parity with the PyTorch checkpoint
  (`pipeline.export_checks.check_parity`, against `torch_logits`).
- `must_agree`: whether a parity failure stops the stage (fp32 exports: a failure there is an
  export bug); an int8 / fp16 variant below `export.min_top1_agreement` is rejected instead.
- `check_gpus`: every variant on each GPU provider against its CPU logits.
- `finish_variant`: `accepted`, the default provider's latency numbers, the val metadata, size.
- `report_test`: after every choice, the test accuracy, once, then the checker and sha256.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch
from torch import nn

from pipeline import onnx_tools, paths
from pipeline.config import Params
from pipeline.errors import DataError
from pipeline.export_checks import check_parity, gpu_check
from pipeline.manifest import latency_keys, model_metadata
from pipeline.variants import VariantSpec

if TYPE_CHECKING:
    from pipeline.export import ExportInputs

COMPRESS_REPORT = paths.report_file("compress")  # which variants compress accepted
CPU = "CPUExecutionProvider"


@dataclass
class ExportedVariant:
    spec: VariantSpec
    proto: onnx.ModelProto  # with metadata, checked
    entry: dict  # the manifest entry
    logits: np.ndarray = field(repr=False)  # CPU logits on the val split
    sessions: dict = field(default_factory=dict, repr=False)  # provider -> InferenceSession


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
    info = inputs.info  # the same uint8-pixel graph as compress's, at `opset`
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        return onnx_tools.export_onnx(
            inputs.models[spec.checkpoint],
            Path(tmp) / "model.onnx",
            tuple(info["shape"]),
            opset=opset,
            mean=info["mean"],
            std=info["std"],
        )


def evaluate_variant(
    spec: VariantSpec, inputs: ExportInputs, params: Params, reference: np.ndarray
) -> ExportedVariant:
    """Build and annotate one variant, score it on val on the CPU, check parity against PyTorch
    there (`reference`: the checkpoint's logits on val)."""
    compress_entry = inputs.compress_variants.get(spec.source.name)
    if compress_entry is None:
        raise DataError(
            f"{COMPRESS_REPORT}: no entry for {spec.source}; re-run the compress stage"
        )
    proto = build_proto(spec, inputs, params.export.opset)
    onnx_tools.write_metadata(proto, model_metadata(spec, inputs.info, params))
    session, _ = onnx_tools.session_for(proto.SerializeToString(), CPU)
    logits = onnx_tools.run_logits(session, inputs.pixels["val"])  # the val images of `reference`
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
    """A parity failure stops the stage for fp32 exports (an export bug). int8 and fp16 are
    lossy by design: below `export.min_top1_agreement` `finish_variant` rejects them, and the
    stage goes on (a quantized model that disagrees with its float one on 3 of 270 images,
    while compress found it within the accuracy budget, used to stop the whole pipeline)."""
    return variant.spec.precision == "fp32"


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


def parity_reason(parity: dict) -> str:
    """Why a variant that compress accepted is rejected here: its parity check, in numbers."""
    return (
        f"failed the parity check: {parity['criterion']} with the {parity['reference']} "
        f"model, measured {parity['top1_agreement']:.4f} (val images disagreeing: "
        f"{parity['disagreeing']})"
    )


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
        else parity_reason(entry["parity"]),
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


def report_test(variant: ExportedVariant, pixels: np.ndarray, y_test: np.ndarray) -> None:
    """After every choice: the test accuracy, once, into the entry and the file's metadata, then
    checker, sha256 and final size. Written at a fixed width, so every file grows by the same
    bytes and the size order `recommend` read stands."""
    logits = onnx_tools.run_logits(variant.sessions[CPU], pixels)  # uint8 NHWC test images
    accuracy = float((logits.argmax(1) == y_test).mean())
    variant.entry["test_accuracy"] = round(accuracy, 6)
    test = {"test_accuracy": f"{accuracy:.6f}", "test_images": len(y_test)}
    onnx_tools.write_metadata(variant.proto, test)
    onnx.checker.check_model(variant.proto, full_check=True)
    data = variant.proto.SerializeToString()
    variant.entry.update(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
