"""The checks an exported model must pass: parity with PyTorch, GPU providers against the CPU.

- `check_parity`: fp32 logits within `export.parity_atol` of the PyTorch model's; int8 / fp16
  top-1 agreeing with it on at least `export.min_top1_agreement` of the val images (a parity
  failure flips `accepted`, so it is a decision: it never reads the test split). Both sides
  see the same images: the ONNX model their uint8 NHWC pixels (it normalises them in its
  graph), PyTorch the floats `DeviceData` normalised.
- `gpu_status` / `gpu_check`: GPU providers are tried only when `torch.cuda.is_available()`
  (ONNX Runtime lists them anyway and prints load errors when asked for them); each variant on
  each provider that really starts is compared with its CPU outputs.
- `failure_table`: what disagreed, one line per failed check, for the stage's error message.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline import onnx_tools
from pipeline.config import ExportConfig, Params
from pipeline.errors import StageFailed


def check_parity(
    precision: str, logits: np.ndarray, reference: np.ndarray, cfg: ExportConfig, source: str
) -> dict:
    """fp32: max |logit difference| <= parity_atol; int8 / fp16: top-1 agreement.

    `reference` holds the PyTorch logits of the same images, `source` names that model.
    """
    agree = logits.argmax(1) == reference.argmax(1)
    per_image = np.abs(logits - reference).max(axis=1)
    if precision == "fp32":
        bad = np.flatnonzero(per_image > cfg.parity_atol)
        criterion = f"max |logit diff| <= {cfg.parity_atol:g}"
        passed = not len(bad)
    else:
        bad = np.flatnonzero(~agree)
        criterion = f"top-1 agreement >= {cfg.min_top1_agreement:g}"
        passed = float(agree.mean()) >= cfg.min_top1_agreement
    return {
        "passed": bool(passed),
        "reference": f"PyTorch {source}",
        "criterion": criterion,
        "max_abs_diff": float(per_image.max()),
        "top1_agreement": round(float(agree.mean()), 6),
        "disagreeing": int(len(bad)),
        "disagreeing_images": bad[:10].tolist(),  # val-split indices, first 10
    }


def failure_table(rows: list[tuple[str, str, dict]], n_images: int) -> str:
    """The checks that failed, one line each: variant, where, criterion, measured values."""
    lines = [
        f"{len(rows)} check(s) failed on {n_images} val images:",
        f"{'variant':<12} {'compared':<34} {'criterion':<30} {'max diff':>9} {'top-1':>7}  "
        f"disagreeing (first val indices)",
    ]
    for name, where, p in rows:
        first = ", ".join(str(i) for i in p["disagreeing_images"])
        lines.append(
            f"{name:<12} {where:<34} {p['criterion']:<30} {p['max_abs_diff']:>9.2e} "
            f"{p['top1_agreement']:>7.4f}  {p['disagreeing']} ({first})"
        )
    return "\n".join(lines)


def gpu_check(
    name: str,
    model_bytes: bytes,
    pixels: np.ndarray,
    cpu_logits: np.ndarray,
    cfg: ExportConfig,
    providers: list[str],
) -> tuple[list[dict], dict]:
    """Run one variant on each GPU provider; (check records, provider -> open session).

    `pixels`: the val images as the model takes them (uint8 NHWC), `cpu_logits` its CPU
    outputs on them."""
    records, sessions = [], {}
    for provider in providers:
        session, actual = onnx_tools.session_for(model_bytes, provider)
        record = {"variant": name, "provider": provider, "ran": actual == provider}
        if record["ran"]:
            logits = onnx_tools.run_logits(session, pixels)
            agree = logits.argmax(1) == cpu_logits.argmax(1)
            record.update(
                top1_agreement=round(float(agree.mean()), 6),
                max_abs_diff=float(np.abs(logits - cpu_logits).max()),
                passed=bool(agree.mean() >= cfg.min_top1_agreement),
                disagreeing=int((~agree).sum()),
                disagreeing_images=np.flatnonzero(~agree)[:10].tolist(),
                criterion=f"top-1 agreement with CPU >= {cfg.min_top1_agreement:g}",
            )
            sessions[provider] = session
        else:
            record.update(passed=False, ran_on=actual)
        records.append(record)
    return records, sessions


def gpu_status(params: Params) -> tuple[str, list[str]]:
    """(what reports/export.json says about the GPU, GPU providers to try)."""
    if not torch.cuda.is_available():
        status, providers = "not available", []
    elif params.device == "cpu":
        status, providers = "not requested (device: cpu)", []
    else:
        providers = onnx_tools.gpu_providers()
        status = "pending" if providers else "no GPU provider in this ONNX Runtime build"
    if params.export.require_gpu and not providers:
        raise StageFailed(
            f"export.require_gpu is true but no GPU inference is possible here ({status}); "
            f"run on a machine with a CUDA GPU or set export.require_gpu: false"
        )
    return status, providers


def summarize_gpu(
    status: str, providers: list[str], ran: list[str], records: list[dict], params: Params
) -> str:
    """The GPU line of reports/export.json once the providers were tried."""
    if not providers:
        return status
    if ran:
        return "ok: " + ", ".join(ran)
    fell_back = sorted({f"{r['provider']} -> {r.get('ran_on')}" for r in records})
    status = f"failed: no GPU provider started ({'; '.join(fell_back)})"
    if params.export.require_gpu:
        raise StageFailed(f"export.require_gpu is true but {status}")
    return status
