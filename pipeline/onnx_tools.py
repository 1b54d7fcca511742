"""The one ONNX helper: export, metadata, checks and ONNX Runtime sessions for every stage.

- `export_onnx(model, path, input_shape, mean=..., std=...)`: `torch.onnx.export(dynamo=True,
  external_data=False)` with a dynamic batch axis, then `add_preprocessing`: the file's input
  `input` is uint8 pixels, batch x H x W x C (NHWC: what PIL, NumPy and OpenCV give for an
  image, `np.asarray(img)[None]`), and the graph itself casts to float, divides by 255 and
  normalises with the training mean / std before the model (output `logits`, float32);
  `onnx.checker` full check, optional `metadata_props`, written atomically. Every exported
  model is built this way, so any ONNX runtime classifies a resized image with no code of ours.
- `pixels_nhwc(images)`: prepared uint8 N x C x H x W images -> the models' uint8 NHWC input.
- `write_metadata` / `read_metadata`: string key/values in the model's `metadata_props`
  (values that are not strings are stored as JSON).
- `providers(device)`: the ONNX Runtime providers to ask for. CUDA / TensorRT are requested only
  when `torch.cuda.is_available()`: ONNX Runtime lists them even without a GPU and prints load
  errors when asked for them.
- `make_session(path, device)` -> (session, the provider that really runs it);
  `run_logits(session, x)` runs batches of an array of the model's input type (uint8 NHWC
  pixels for our models; a float array is refused there, never silently cast).
- `quantize_int8(fp32, out, calibration_images, method)`: ONNX Runtime static QDQ int8
  (per-channel weights, QUInt8 activations, float32 biases: OpenCV's DNN module cannot run
  int32 ones) after `quant_pre_process`; calibrated on uint8
  pixels, the preprocessing nodes stay float, their mean / std broadcast to a whole image
  (`expand_preprocessing_constants`: 1.4x -> 1.9x fp32 throughput on the CIFAR-size `cnn`).
- `convert_fp16(fp32, out)`: fp16 weights and compute (the preprocessing too), uint8 input and
  float32 logits kept.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import torch
from torch import nn

from pipeline.files import atomic_path

CPU = "CPUExecutionProvider"
INPUT_NAME = "input"  # uint8 pixels, batch x H x W x C
OUTPUT_NAME = "logits"
NORMALIZED_NAME = "normalized"  # inside the graph: the float32 NCHW tensor the model reads
PREPROCESS_PREFIX = "preprocess/"
INPUT_DTYPES = {"tensor(uint8)": np.uint8, "tensor(float)": np.float32}  # ORT type -> NumPy


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
    *,
    mean: Sequence[float],
    std: Sequence[float],
) -> onnx.ModelProto:
    """Export `model` (CPU, eval, float32) with a dynamic batch axis; returns the saved proto.

    `input_shape` is the model's (C, H, W); `mean` / `std` (one per channel) the normalisation
    it was trained with. The saved graph takes uint8 NHWC pixels (`add_preprocessing`).
    """
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
    proto = add_preprocessing(program.model_proto, mean, std)
    if metadata:
        write_metadata(proto, metadata)
    save_model(proto, path)
    return proto


def add_preprocessing(
    proto: onnx.ModelProto, mean: Sequence[float], std: Sequence[float]
) -> onnx.ModelProto:
    """Make a model of float32 NCHW input `input` take uint8 NHWC pixels; returns `proto`.

    Nodes named `preprocess/...` go in front: Transpose to NCHW, Cast to float32, / 255,
    - mean, / std, in the order and precision `pipeline.data.DeviceData` normalises the
    training images (so fp32 logits match PyTorch's to float rounding). Their output,
    `normalized`, is what the model's first layer reads.
    """
    graph = proto.graph
    if len(graph.input) != 1 or graph.input[0].name != INPUT_NAME:
        raise ValueError(f"add_preprocessing needs one graph input named {INPUT_NAME!r}")
    tensor_type = graph.input[0].type.tensor_type
    if tensor_type.elem_type != onnx.TensorProto.FLOAT or len(tensor_type.shape.dim) != 4:
        raise ValueError("add_preprocessing needs a float32 N x C x H x W input")
    batch, channels, height, width = tensor_type.shape.dim
    if len(mean) != channels.dim_value or len(std) != channels.dim_value:
        raise ValueError(f"mean / std need {channels.dim_value} values (one per channel)")
    for node in graph.node:
        node.input[:] = [NORMALIZED_NAME if name == INPUT_NAME else name for name in node.input]
    normalized = graph.value_info.add()
    normalized.CopyFrom(graph.input[0])
    normalized.name = NORMALIZED_NAME
    del graph.input[:]
    pixels = graph.input.add()
    pixels.name = INPUT_NAME
    pixels.type.tensor_type.elem_type = onnx.TensorProto.UINT8
    for dim in (batch, height, width, channels):
        pixels.type.tensor_type.shape.dim.add().CopyFrom(dim)
    f32, p = np.float32, PREPROCESS_PREFIX
    constants = {
        f"{p}scale": np.array(255.0, f32),
        f"{p}mean": np.array(mean, f32).reshape(1, -1, 1, 1),
        f"{p}std": np.array(std, f32).reshape(1, -1, 1, 1),
    }
    graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in constants.items())
    steps = [  # (node name, op, inputs, output, attributes)
        ("transpose", "Transpose", [INPUT_NAME], f"{p}nchw", {"perm": [0, 3, 1, 2]}),
        ("cast", "Cast", [f"{p}nchw"], f"{p}float", {"to": onnx.TensorProto.FLOAT}),
        ("divide", "Div", [f"{p}float", f"{p}scale"], f"{p}unit", {}),
        ("center", "Sub", [f"{p}unit", f"{p}mean"], f"{p}centred", {}),
        ("normalize", "Div", [f"{p}centred", f"{p}std"], NORMALIZED_NAME, {}),
    ]
    for name, op, inputs, output, attributes in reversed(steps):
        graph.node.insert(0, onnx.helper.make_node(op, inputs, [output], p + name, **attributes))
    return proto


def expand_preprocessing_constants(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Broadcast the preprocessing's per-channel mean / std to a whole image; returns `proto`.

    An `Expand` to 1 x C x H x W (ONNX Runtime folds it when it loads the model, so the file
    stays as small) feeds the `preprocess/` Sub and Div; the arithmetic is unchanged, so the
    logits are bit for bit the same. Why: in an int8 graph ONNX Runtime's layout transformer
    runs the convolutions in NHWC and moves the input Transpose behind the normalisation, whose
    1 x C x 1 x 1 operands then broadcast over an innermost axis of C elements; ORT's binary
    kernels run that 15-20x slower (Sub and Div took 0.53 ms each of an int8 `cnn`'s 4.1 ms per
    batch of 64 3x32x32 images). An image-sized operand broadcasts over the batch only.
    A graph without `add_preprocessing`'s nodes or without fixed H and W is left as it is.
    """
    graph, p = proto.graph, PREPROCESS_PREFIX
    dims = graph.input[0].type.tensor_type.shape.dim
    constants = {i.name for i in graph.initializer}
    if len(dims) != 4 or not {f"{p}mean", f"{p}std"} <= constants:
        return proto
    _, height, width, channels = dims
    sizes = [d.dim_value for d in (channels, height, width)]
    if not all(sizes):
        return proto
    shape_name = f"{p}image_shape"
    image_shape = np.array([1, *sizes], np.int64)
    graph.initializer.append(onnx.numpy_helper.from_array(image_shape, shape_name))
    expands = []
    for name in (f"{p}mean", f"{p}std"):
        expand = onnx.helper.make_node(
            "Expand", [name, shape_name], [f"{name}_image"], f"{name}_image"
        )
        expands.append(expand)
        for node in graph.node:
            if node.name.startswith(p):
                node.input[:] = [f"{name}_image" if i == name else i for i in node.input]
    for node in reversed(expands):
        graph.node.insert(0, node)
    return proto


def preprocessing_nodes(proto: onnx.ModelProto) -> list[str]:
    """Names of the nodes `add_preprocessing` put in front (kept float32 by int8 / fp16)."""
    return [node.name for node in proto.graph.node if node.name.startswith(PREPROCESS_PREFIX)]


def pixels_nhwc(images) -> np.ndarray:
    """uint8 N x C x H x W images (tensor or array) -> the models' input, uint8 N x H x W x C.

    A view when it can be (no copy of a whole split); batches are made contiguous when run.
    """
    array = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.dtype != np.uint8 or array.ndim != 4:
        raise ValueError(
            f"pixels_nhwc needs uint8 N x C x H x W images, got {array.dtype} {array.shape}"
        )
    return array.transpose(0, 2, 3, 1)


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


def input_array(session, x: np.ndarray) -> np.ndarray:
    """`x` as the session's input type: uint8 pixels stay uint8 (a float array is refused, not
    cast: it would be normalised twice), a float input gets float32."""
    kind = session.get_inputs()[0].type
    dtype = INPUT_DTYPES.get(kind, np.float32)
    if dtype == np.uint8 and x.dtype != np.uint8:
        raise ValueError(f"the model takes uint8 pixels (N x H x W x C); got a {x.dtype} array")
    return np.ascontiguousarray(x, dtype=dtype)


def run_logits(session, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Run `x` (uint8 NHWC pixels for our models) through `session` in batches; float32
    logits."""
    name = session.get_inputs()[0].name
    outs = [
        session.run(None, {name: input_array(session, x[i : i + batch_size])})[0]
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(outs).astype(np.float32)


def file_size(path: str | Path) -> int:
    return os.path.getsize(path)


class _CalibrationReader:
    """Feeds calibration batches to ONNX Runtime's calibrator (its CalibrationDataReader API).

    `images` are the model's input: uint8 NHWC pixels (`pixels_nhwc`). Batches of equal size,
    at most `batch_size` (fewer images left out than there are batches): ORT's histogram
    calibrators (entropy, percentile) fail on a shorter last batch ("inhomogeneous shape")."""

    def __init__(self, images: np.ndarray, batch_size: int):
        if images.dtype != np.uint8:
            raise ValueError(f"calibration images must be uint8 pixels; got {images.dtype}")
        count = -(-len(images) // batch_size)
        size = len(images) // count
        self._batches = [
            {INPUT_NAME: np.ascontiguousarray(images[i * size : (i + 1) * size])}
            for i in range(count)
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
    on our x86 CPUs), float32 biases (so that OpenCV's DNN module runs it), ranges calibrated
    on `calibration_images` (uint8 NHWC pixels) with `method` (minmax | entropy |
    percentile), after ORT's `quant_pre_process` (shape inference and graph optimisation);
    the float preprocessing's mean / std then broadcast to a whole image
    (`expand_preprocessing_constants`). `metadata_props` are carried over from the fp32
    model, updated with `metadata`.
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
            # the uint8 -> float preprocessing stays float: quantizing it would only add error
            # (ORT 1.31 quantizes no Div / Sub anyway; this keeps it so if that changes)
            nodes_to_exclude=preprocessing_nodes(onnx.load(str(prepared))),
            # Biases stay float32 (ORT still fuses QLinearConv / QGemm and quantizes them
            # itself). An int32 bias behind a DequantizeLinear breaks OpenCV's DNN module:
            # 5.x refuses to load it (`bufidx >= 0` in argTensor), 4.x gets every image but the
            # first of a batch wrong (README "Runs in other runtimes", test_runtimes.py).
            extra_options={"QuantizeBias": False},
        )
        proto = _copy_metadata(fp32_path, onnx.load(str(quantized)), metadata)
    save_model(expand_preprocessing_constants(proto), path)
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
    """fp16 weights and compute, uint8 input kept, float32 logits (`keep_io_types`); returns
    the proto.

    The preprocessing's Cast becomes uint8 -> fp16 (exact for 0..255) and the normalisation
    runs in fp16 like the model. (Keeping it float32 with the converter's `node_block_list`
    is worse: the converter rounds through fp16 between every pair of blocked nodes.)
    Uses `onnxruntime.transformers.float16.convert_float_to_float16`; `metadata_props` are
    carried over from the fp32 model, updated with `metadata`.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    _sort_nodes(proto.graph)  # the converter appends its input casts after their consumers
    proto = _copy_metadata(fp32_path, proto, metadata)
    save_model(proto, path)
    return proto


@functools.cache
def _preload_cuda_libraries() -> None:
    """`onnxruntime.preload_dlls()` once, before any CUDA session: it loads the CUDA / cuDNN
    libraries of the NVIDIA pip packages torch installed, so the CUDA provider finds them.

    Only in GPU builds of ONNX Runtime >= 1.21 (elsewhere it does not exist: nothing to do).
    It prints notes on stdout and may raise when a library is missing; both are swallowed:
    a provider that still cannot start falls back to the CPU, which `session_for` reports.
    """
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):
            ort.preload_dlls()


def gpu_providers() -> list[str]:
    """GPU providers worth trying here, best first; none unless `torch.cuda.is_available()`.

    TensorRT only when its runtime library loads (ONNX Runtime lists the provider either way).
    Whether a provider really runs is known only from a session: see `session_for`.
    """
    import ctypes

    import onnxruntime as ort

    if not torch.cuda.is_available():
        return []
    _preload_cuda_libraries()
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
    """Latency at batch 1 and throughput at `batch_size` of one session on real images.

    Batch 1: `interleaved_latency` with one session (`warmup_runs`, then `runs` timed runs in
    one round); p50 / p95 in milliseconds. Batch `batch_size`: `throughput`.
    """
    (times_ms,) = interleaved_latency({"model": session}, images, 1, runs, warmup_runs)["model"]
    return {
        "latency_ms_p50_b1": float(np.percentile(times_ms, 50)),
        "latency_ms_p95_b1": float(np.percentile(times_ms, 95)),
        f"throughput_b{batch_size}": throughput(session, images, batch_size, runs),
    }


def interleaved_latency(
    sessions: dict,
    images: np.ndarray,
    rounds: int = 5,
    runs: int = 20,
    warmup_runs: int = 10,
    batch: int = 1,
    min_round_s: float = 0.0,
) -> dict[str, list[list[float]]]:
    """Latency of several sessions timed in turns, so that a slow spell of a shared machine
    hits each of them alike: `warmup_runs` untimed runs each, then `rounds` rounds, each timing
    `runs` runs of every session on `batch` images (cycling over `images`, repeated when there
    are fewer), the order rotated by one each round. name -> per round, the run times in ms.

    `min_round_s`: each session's warm-up and each of its rounds also last at least this long
    (more runs, as `timeit` does), so a model of a few microseconds is timed over enough runs
    for its round medians, and the spread between them, to repeat from one call to the next."""
    import time

    if len(images) < batch:
        images = np.concatenate([images] * -(-batch // len(images)))
    singles = [
        np.ascontiguousarray(images[i : i + batch])
        for i in range(0, len(images) - batch + 1, batch)
    ]
    names = list(sessions)
    feeds = {n: sessions[n].get_inputs()[0].name for n in names}
    for n in names:
        i, until = 0, time.perf_counter() + min_round_s
        while i < warmup_runs or time.perf_counter() < until:
            sessions[n].run(None, {feeds[n]: singles[i % len(singles)]})
            i += 1
    times: dict[str, list[list[float]]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            session, feed, round_ms = sessions[n], feeds[n], []
            until = time.perf_counter() + min_round_s
            while len(round_ms) < runs or time.perf_counter() < until:
                start = time.perf_counter()
                session.run(None, {feed: singles[len(round_ms) % len(singles)]})
                round_ms.append((time.perf_counter() - start) * 1e3)
            times[n].append(round_ms)
    return times


def throughput(session, images: np.ndarray, batch_size: int = 64, runs: int = 100) -> float:
    """Images per second at `batch_size` (images repeated when there are fewer): three untimed
    runs (a new shape costs a first-run allocation), then max(5, runs // 5) timed runs; from the
    median run (robust to other processes on a shared machine)."""
    import time

    name = session.get_inputs()[0].name
    reps = -(-batch_size // len(images))
    batch = np.ascontiguousarray(np.concatenate([images] * reps)[:batch_size])
    batch_seconds = []
    for i in range(3 + max(5, runs // 5)):
        start = time.perf_counter()
        session.run(None, {name: batch})
        if i >= 3:
            batch_seconds.append(time.perf_counter() - start)
    return batch_size / float(np.median(batch_seconds))
