"""The one ONNX helper: export, metadata, checks and ONNX Runtime sessions for every stage.

- `export_onnx(model, path, input_shape)`: `torch.onnx.export(dynamo=True, external_data=False)`
  with a dynamic batch axis (input `input`, NCHW float32; output `logits`), `onnx.checker` full
  check, optional `metadata_props`, written atomically.
- `write_metadata` / `read_metadata`: string key/values in the model's `metadata_props`
  (values that are not strings are stored as JSON).
- `providers(device)`: the ONNX Runtime providers to ask for. CUDA / TensorRT are requested only
  when `torch.cuda.is_available()`: ONNX Runtime lists them even without a GPU and prints load
  errors when asked for them.
- `make_session(path, device)` -> (session, the provider that really runs it);
  `run_logits(session, x)` runs batches of a float32 NCHW array.
- `quantize_int8(fp32, out, calibration_images, method)`: ONNX Runtime static QDQ int8
  (per-channel weights, QUInt8 activations) after `quant_pre_process`.
- `convert_fp16(fp32, out)`: fp16 weights and compute, float32 inputs and outputs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from pipeline.files import atomic_path

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def write_metadata(model_proto: onnx.ModelProto, metadata: dict) -> onnx.ModelProto:
    """Set `metadata_props` (replacing keys already there). Non-strings are stored as JSON."""
    existing = {p.key: p.value for p in model_proto.metadata_props}
    for key, value in metadata.items():
        existing[key] = value if isinstance(value, str) else json.dumps(value)
    del model_proto.metadata_props[:]
    for key, value in existing.items():
        model_proto.metadata_props.add(key=key, value=value)
    return model_proto


def read_metadata(path_or_proto) -> dict[str, str]:
    """`metadata_props` as a dict of strings (use `json.loads` for structured values)."""
    if isinstance(path_or_proto, onnx.ModelProto):
        proto = path_or_proto
    else:
        proto = onnx.load(str(path_or_proto), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def save_model(model_proto: onnx.ModelProto, path: str | Path, check: bool = True) -> None:
    """Full `onnx.checker` check, then an atomic write (a single file, no external data)."""
    if check:
        onnx.checker.check_model(model_proto, full_check=True)
    with atomic_path(path) as tmp:
        onnx.save_model(model_proto, str(tmp), save_as_external_data=False)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_shape: tuple[int, int, int],
    metadata: dict | None = None,
    opset: int | None = None,
) -> onnx.ModelProto:
    """Export `model` (CPU, eval, float32) with a dynamic batch axis; returns the saved proto."""
    model = model.eval().cpu().float().to(memory_format=torch.contiguous_format)
    example = torch.zeros(2, *input_shape)
    kwargs = {"opset_version": opset} if opset else {}
    # The exporter prints progress lines on stdout; keep stage output readable.
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            external_data=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            **kwargs,
        )
    proto = program.model_proto
    if metadata:
        write_metadata(proto, metadata)
    save_model(proto, path)
    return proto


def providers(device: str = "auto") -> list[str]:
    """Providers to request, best first: the working GPU ones (`gpu_providers`) unless
    `device` is cpu, then the CPU."""
    gpu = gpu_providers() if device in ("auto", "cuda") else []
    return gpu + ["CPUExecutionProvider"]


def _session(source: str | bytes, requested: list[str], threads: int | None):
    """(InferenceSession, provider that really runs it). Quiet: ORT warnings stay in its log."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(source, sess_options=options, providers=requested)
    return session, session.get_providers()[0]


def make_session(path: str | Path, device: str = "auto", threads: int | None = None):
    """(InferenceSession, provider that runs it) with the best providers for `device`."""
    return _session(str(path), providers(device), threads)


def run_logits(session, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Run a float32 NCHW array through `session` in batches; float32 logits."""
    name = session.get_inputs()[0].name
    outs = [
        session.run(None, {name: np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32)})[0]
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(outs).astype(np.float32)


def file_size(path: str | Path) -> int:
    return os.path.getsize(path)


class _CalibrationReader:
    """Feeds calibration batches to ONNX Runtime's calibrator (its CalibrationDataReader API)."""

    def __init__(self, images: np.ndarray, batch_size: int):
        self._batches = [
            {INPUT_NAME: np.ascontiguousarray(images[i : i + batch_size], dtype=np.float32)}
            for i in range(0, len(images), batch_size)
        ]
        self.rewind()

    def get_next(self) -> dict | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self._batches)


def _copy_metadata(
    source: str | Path, target_proto: onnx.ModelProto, extra: dict | None
) -> onnx.ModelProto:
    """The source model's `metadata_props` (plus `extra`) on the derived model."""
    return write_metadata(target_proto, read_metadata(source) | (extra or {}))


def quantize_int8(
    fp32_path: str | Path,
    path: str | Path,
    calibration_images: np.ndarray,
    method: str = "minmax",
    batch_size: int = 64,
    metadata: dict | None = None,
) -> onnx.ModelProto:
    """ONNX Runtime static QDQ int8 of an fp32 model; returns the saved proto.

    Per-channel QInt8 weights, QUInt8 activations (signed activations ran 2-3x slower than fp32
    on our x86 CPUs), ranges calibrated on `calibration_images` (normalised float32 NCHW) with
    `method` (minmax | entropy | percentile), after ORT's `quant_pre_process` (shape inference
    and graph optimisation). `metadata_props` are carried over from the fp32 model, updated
    with `metadata`.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if method not in methods:
        raise ValueError(f"calibration method {method!r}; expected one of {', '.join(methods)}")
    if len(calibration_images) == 0:
        raise ValueError("quantize_int8 needs at least one calibration image")
    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_static(
            str(prepared),
            str(quantized),
            _CalibrationReader(calibration_images, batch_size),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
        )
        proto = _copy_metadata(fp32_path, onnx.load(str(quantized)), metadata)
    save_model(proto, path)
    return proto


def _sort_nodes(graph: onnx.GraphProto) -> None:
    """Reorder `graph.node` topologically (stable), as `onnx.checker` requires."""
    produced = {out for node in graph.node for out in node.output}
    ready = set()
    pending, ordered = list(graph.node), []
    while pending:
        remaining = []
        for node in pending:
            if all(name in ready or name not in produced for name in node.input if name):
                ordered.append(node)
                ready.update(node.output)
            else:
                remaining.append(node)
        if len(remaining) == len(pending):
            raise ValueError("ONNX graph has a cycle; cannot sort its nodes")
        pending = remaining
    copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered]
    del graph.node[:]
    graph.node.extend(copies)


def convert_fp16(
    fp32_path: str | Path, path: str | Path, metadata: dict | None = None
) -> onnx.ModelProto:
    """fp16 weights and compute, float32 inputs and outputs (`keep_io_types`); returns the proto.

    Uses `onnxruntime.transformers.float16.convert_float_to_float16`; `metadata_props` are
    carried over from the fp32 model, updated with `metadata`.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    _sort_nodes(proto.graph)  # the converter appends its input casts after their consumers
    proto = _copy_metadata(fp32_path, proto, metadata)
    save_model(proto, path)
    return proto


def gpu_providers() -> list[str]:
    """GPU providers worth trying here, best first; none unless `torch.cuda.is_available()`.

    TensorRT only when its runtime library loads (ONNX Runtime lists the provider either way).
    Whether a provider really runs is known only from a session: see `session_for`.
    """
    import ctypes

    import onnxruntime as ort

    if not torch.cuda.is_available():
        return []
    available = ort.get_available_providers()
    chosen = []
    if "TensorrtExecutionProvider" in available:
        for lib in ("libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so"):
            with contextlib.suppress(OSError):
                ctypes.CDLL(lib)
                chosen.append("TensorrtExecutionProvider")
                break
    if "CUDAExecutionProvider" in available:
        chosen.append("CUDAExecutionProvider")
    return chosen


def session_for(
    model: str | Path | bytes, provider: str = "CPUExecutionProvider", threads: int | None = None
):
    """(InferenceSession, provider that really runs it) for one requested provider.

    `model` is a path or serialized bytes. CPU is the fallback ONNX Runtime takes when the
    requested provider cannot start; compare the returned provider with the requested one.
    """
    requested = [provider]
    if provider != "CPUExecutionProvider":
        requested.append("CPUExecutionProvider")
    return _session(model if isinstance(model, bytes) else str(model), requested, threads)


def benchmark(
    session, images: np.ndarray, batch_size: int = 64, warmup_runs: int = 10, runs: int = 100
) -> dict:
    """Latency at batch 1 and throughput at `batch_size` on real (normalised NCHW) images.

    Batch 1: `warmup_runs` untimed runs, then `runs` timed runs cycling over `images`;
    p50 / p95 in milliseconds. Batch `batch_size` (images repeated when there are fewer): three
    untimed runs (a new shape costs a first-run allocation), then max(5, runs // 5) timed runs;
    images per second from the median run (robust to other processes on a shared machine).
    """
    import time

    name = session.get_inputs()[0].name
    images = np.ascontiguousarray(images, dtype=np.float32)
    singles = [images[i : i + 1] for i in range(len(images))]
    for i in range(warmup_runs):
        session.run(None, {name: singles[i % len(singles)]})
    times_ms = []
    for i in range(runs):
        start = time.perf_counter()
        session.run(None, {name: singles[i % len(singles)]})
        times_ms.append((time.perf_counter() - start) * 1e3)
    reps = -(-batch_size // len(images))
    batch = np.ascontiguousarray(np.concatenate([images] * reps)[:batch_size])
    batch_seconds = []
    for i in range(3 + max(5, runs // 5)):
        start = time.perf_counter()
        session.run(None, {name: batch})
        if i >= 3:
            batch_seconds.append(time.perf_counter() - start)
    return {
        "latency_ms_p50_b1": float(np.percentile(times_ms, 50)),
        "latency_ms_p95_b1": float(np.percentile(times_ms, 95)),
        f"throughput_b{batch_size}": batch_size / float(np.median(batch_seconds)),
    }
