"""A linear classifier written directly as an ONNX graph, for fast inference tests.

`linear_classifier(path, ...)` writes `logits = flatten(x) @ weight + bias` with the pipeline's
metadata, in milliseconds (no torch export, no training), so tests know every logit exactly.
Like every exported model it takes uint8 NHWC pixels: `x` is the output of the pipeline's own
`onnx_tools.add_preprocessing` (/255, (x - mean) / std, NCHW), flattened in C, H, W order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline import onnx_tools
from pipeline.inference import METADATA_FORMAT


def linear_classifier(
    path: Path,
    input_shape: tuple[int, int, int] = (1, 4, 4),
    classes=("a", "b", "c"),
    *,
    weight: np.ndarray | None = None,
    bias=None,
    mean=None,
    std=None,
    metadata: dict | None = None,
    drop: tuple[str, ...] = (),
    graph_input_shape=None,
    preprocess: bool = True,
) -> Path:
    """Write the model to `path` and return it.

    `metadata` overrides (or adds) metadata keys, `drop` removes some; `graph_input_shape`
    gives the graph's input another (C, H, W) than the metadata's, for mismatch tests (the
    graph then takes that shape as H x W x C pixels; a shape that is not (C, H, W) stays a
    float input). `preprocess=False`: a graph of the old format, normalised float NCHW input.
    """
    channels, height, width = input_shape
    graph_shape = graph_input_shape or input_shape
    n_inputs, n_classes = int(np.prod(graph_shape)), len(classes)
    weight = np.zeros((n_inputs, n_classes)) if weight is None else np.asarray(weight)
    bias = np.zeros(n_classes) if bias is None else np.asarray(bias)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", [onnx_tools.INPUT_NAME], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "weight"], ["scores"]),
            helper.make_node("Add", ["scores", "bias"], [onnx_tools.OUTPUT_NAME]),
        ],
        "linear",
        [
            helper.make_tensor_value_info(
                onnx_tools.INPUT_NAME, TensorProto.FLOAT, ["batch", *graph_shape]
            )
        ],
        [
            helper.make_tensor_value_info(
                onnx_tools.OUTPUT_NAME, TensorProto.FLOAT, ["batch", n_classes]
            )
        ],
        initializer=[
            numpy_helper.from_array(weight.astype(np.float32), "weight"),
            numpy_helper.from_array(bias.astype(np.float32), "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # what every ONNX Runtime of the last years reads
    mean = [0.0] * channels if mean is None else list(mean)
    std = [1.0] * channels if std is None else list(std)
    if preprocess and len(graph_shape) == 3:
        graph_channels = graph_shape[0]
        onnx_tools.add_preprocessing(
            model,
            (mean * graph_channels)[:graph_channels],
            (std * graph_channels)[:graph_channels],
        )
    meta = {
        "format": METADATA_FORMAT if preprocess else "pipeline.onnx/1",
        "classes": list(classes),
        "mean": mean,
        "std": std,
        "input_shape": [channels, height, width],
        "input_layout": "NHWC" if preprocess else "NCHW",
        "variant": "linear",
    }
    meta |= metadata or {}
    for key in drop:
        meta.pop(key)
    onnx_tools.write_metadata(model, meta)
    onnx.checker.check_model(model, full_check=True)
    onnx_tools.save_model(model, path)
    return path


def conv_net(
    path: Path,
    input_shape=(1, 8, 8),
    widths: tuple[int, ...] = (16,),
    mean=None,
    std=None,
    *,
    metadata: dict | None = None,
    seed: int = 0,
    classes: int = 10,
) -> Path:
    """Write a random conv net taking uint8 NHWC pixels (`add_preprocessing` in front) to
    `path`: per width a Conv-Relu, a 2x2 MaxPool between two of them, then
    GlobalAveragePool-Flatten-Gemm to `classes` logits; opset 21. Weights drawn in layer order
    from `seed`. H and W of `input_shape` may be names (a dynamic image size)."""
    rng = np.random.default_rng(seed)
    channels = input_shape[0]
    mean = [0.5] * channels if mean is None else mean
    std = [0.25] * channels if std is None else std
    make, nodes, initializers, previous, fan_in = (
        helper.make_node,
        [],
        [],
        onnx_tools.INPUT_NAME,
        channels,
    )

    def weight(name, *shape):
        values = (rng.standard_normal(shape) * 0.5).astype(np.float32)
        initializers.append(numpy_helper.from_array(values, name))

    for i, width in enumerate(widths, start=1):
        weight(f"w{i}", width, fan_in, 3, 3)
        weight(f"b{i}", width)
        nodes += [
            make("Conv", [previous, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
            make("Relu", [f"c{i}"], [f"r{i}"]),
        ]
        previous, fan_in = f"r{i}", width
        if i < len(widths):
            nodes.append(
                make("MaxPool", [previous], [f"p{i}"], kernel_shape=[2, 2], strides=[2, 2])
            )
            previous = f"p{i}"
    last = len(widths) + 1
    weight(f"w{last}", classes, fan_in)
    weight(f"b{last}", classes)
    nodes += [
        make("GlobalAveragePool", [previous], ["pooled"]),
        make("Flatten", ["pooled"], ["flat"], axis=1),
        make("Gemm", ["flat", f"w{last}", f"b{last}"], [onnx_tools.OUTPUT_NAME], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [
            helper.make_tensor_value_info(
                onnx_tools.INPUT_NAME, TensorProto.FLOAT, ["n", *input_shape]
            )
        ],
        [helper.make_tensor_value_info(onnx_tools.OUTPUT_NAME, TensorProto.FLOAT, ["n", classes])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx_tools.add_preprocessing(model, mean, std)
    if metadata is not None:
        onnx_tools.write_metadata(model, metadata)
    onnx_tools.save_model(model, path)
    return path
