"""The int8 variant's preprocessing as ONNX Runtime runs it (`onnx_tools.quantize_int8`,
`onnx_tools.expand_preprocessing_constants`).

A small RGB conv net written directly as an ONNX graph, with the exported models' uint8 NHWC
preprocessing in front, quantized in well under a second. In the int8 graph ONNX Runtime runs
the convolutions in NHWC and moves the input Transpose behind the normalisation; per-channel
1 x C x 1 x 1 operands then broadcast over an innermost axis of C elements, a slow path of its
binary kernels (benchmarks/inference.py: 1.4x instead of 1.9x fp32 throughput on the `cnn`).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from pipeline import onnx_tools
from tests.tiny_onnx import conv_net, linear_classifier

MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


def _rgb_cnn(path, height=8, width=8):
    """A random conv net (3 x height x width in, 10 logits) taking uint8 NHWC pixels."""
    return conv_net(path, (3, height, width), (16,), MEAN, STD)


def _pixels(n=40, height=8, width=8):
    return np.random.default_rng(1).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def _logits(path, x):
    session, _ = onnx_tools.make_session(path, "cpu")
    return onnx_tools.run_logits(session, x)


def _optimized(path, tmp_path):
    """The graph ONNX Runtime runs (its default optimisations, as `make_session` asks)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath)


def test_int8_normalisation_broadcasts_over_the_batch_only_in_the_graph_ort_runs(tmp_path):
    fp32 = _rgb_cnn(tmp_path / "fp32.onnx")
    int8 = tmp_path / "int8.onnx"
    onnx_tools.quantize_int8(fp32, int8, _pixels())
    graph = _optimized(int8, tmp_path).graph
    ops = [n.op_type for n in graph.node]
    assert "QLinearConv" in ops and "Transpose" not in ops[: ops.index("QLinearConv")]  # NHWC
    constants = {i.name: i.dims for i in graph.initializer}
    operands = [
        constants[name]
        for node in graph.node
        if node.op_type in ("Sub", "Div")
        for name in node.input
        if name in constants and np.prod(constants[name]) > 1  # not the scalar 255
    ]
    assert len(operands) == 2  # mean and std, each a whole image, not one value per channel
    assert all(np.prod(dims) == 3 * 8 * 8 and dims[0] == 1 for dims in operands), operands
    # the file stays small: the Expand is folded by ONNX Runtime when it loads the model
    saved = onnx.load(str(int8))
    assert max(np.prod(i.dims) for i in saved.graph.initializer if "preprocess" in i.name) == 4


def test_expanded_preprocessing_gives_the_same_logits_bit_for_bit(tmp_path):
    fp32 = _rgb_cnn(tmp_path / "fp32.onnx", height=6, width=10)
    proto = onnx_tools.expand_preprocessing_constants(onnx.load(str(fp32)))
    expanded = tmp_path / "expanded.onnx"
    onnx_tools.save_model(proto, expanded)
    x = _pixels(height=6, width=10)
    assert [n.op_type for n in proto.graph.node[:2]] == ["Expand", "Expand"]
    assert np.array_equal(_logits(expanded, x), _logits(fp32, x))


def test_a_graph_without_fixed_height_and_width_is_left_as_it_is(tmp_path):
    proto = onnx.load(str(_rgb_cnn(tmp_path / "fp32.onnx", height="h", width="w")))
    before = proto.SerializeToString()
    assert onnx_tools.expand_preprocessing_constants(proto).SerializeToString() == before


def test_a_graph_without_the_preprocessing_is_left_as_it_is(tmp_path):
    path = linear_classifier(tmp_path / "m.onnx", (3, 4, 4), mean=MEAN, std=STD, preprocess=False)
    proto = onnx.load(str(path))  # the old format: normalised float NCHW input, no mean / std
    before = proto.SerializeToString()
    assert onnx_tools.expand_preprocessing_constants(proto).SerializeToString() == before


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibration_takes_a_count_that_is_not_a_multiple_of_the_batch(tmp_path, method):
    fp32 = _rgb_cnn(tmp_path / "fp32.onnx")
    int8 = tmp_path / "int8.onnx"
    # 70 images: two batches of 35 (ORT's histogram calibrators failed on 64 + 6)
    onnx_tools.quantize_int8(fp32, int8, _pixels(70), method)
    x = _pixels(200)
    agreement = (_logits(int8, x).argmax(1) == _logits(fp32, x).argmax(1)).mean()
    assert agreement >= 0.9, agreement
