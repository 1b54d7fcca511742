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
