"""pipeline.runtimes and the int8 graph property that lets OpenCV run it.

The int8 tests build a small conv net directly as an ONNX graph (Conv-Relu-MaxPool-Conv-Relu-
GlobalAveragePool-Flatten-Gemm, with the exported models' uint8 preprocessing in front) and
quantize it with `onnx_tools.quantize_int8`, in well under a second. With int32 biases
(ONNX Runtime's default) OpenCV 5 refuses the file and OpenCV 4 gets every image but the first
of a batch wrong: both reproduce here on this graph.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from pipeline import onnx_tools, runtimes
from tests.tiny_onnx import conv_net, linear_classifier

MEAN, STD = [0.3], [0.4]


def _cnn_fp32(path, seed: int = 0):
    """A random small CNN (8x8 grey in, 10 logits) taking uint8 NHWC pixels, opset 21."""
    metadata = {"mean": MEAN, "std": STD, "input_layout": "NHWC"}
    return conv_net(path, (1, 8, 8), (4, 8), MEAN, STD, metadata=metadata, seed=seed)


@pytest.fixture(scope="module")
def int8_cnn(tmp_path_factory):
    """(int8 path, uint8 N x C x H x W images) of the random CNN, calibrated on the images."""
    folder = tmp_path_factory.mktemp("int8")
    images = np.random.default_rng(1).integers(0, 256, (70, 1, 8, 8), dtype=np.uint8)
    fp32 = _cnn_fp32(folder / "fp32.onnx")
    int8 = folder / "int8.onnx"
    onnx_tools.quantize_int8(fp32, int8, onnx_tools.pixels_nhwc(images[:64]))
    return int8, images


def test_int8_keeps_float_biases_and_int8_weights(int8_cnn):
    path, _ = int8_cnn
    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    dequantized = {n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    # no int32 tensor behind a DequantizeLinear: what OpenCV's importers mishandle
    assert not [n for n in dequantized if n in inits and inits[n].data_type == TensorProto.INT32]
    layers = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(layers) == 3
    for node in layers:
        assert inits[node.input[2]].data_type == TensorProto.FLOAT  # the bias, as trained
        weight_dq = next(n for n in graph.node if n.output[0] == node.input[1])
        assert weight_dq.op_type == "DequantizeLinear"  # weights still int8: size benefit kept
        assert inits[weight_dq.input[0]].data_type == TensorProto.INT8


@pytest.mark.parametrize("runtime", ["opencv5", "opencv4", "onnx_reference"])
@pytest.mark.parametrize("batch_size", [1, 64])
def test_int8_runs_in_runtime_like_onnxruntime(int8_cnn, runtime, batch_size):
    path, images = int8_cnn
    x = runtimes.model_input(path, images)
    expected = runtimes.onnxruntime_logits(path, x)
    logits = runtimes.runtime_logits(runtime, path, x, batch_size)
    assert logits.shape == (70, 10)
    # same int8 weights and activations; ORT quantizes the float biases itself, the others not
    tolerance = 0.02 * np.abs(expected).max()
    assert np.abs(logits - expected).max() <= tolerance, np.abs(logits - expected).max(1)[:8]
    assert (logits.argmax(1) == expected.argmax(1)).mean() >= 0.99


def test_model_input_normalises_for_a_float_nchw_model(tmp_path):
    path = linear_classifier(
        tmp_path / "m.onnx", (1, 2, 2), mean=[0.5], std=[0.25], preprocess=False
    )
    images = np.array([[[[0, 255], [51, 128]]]], np.uint8)
    x = runtimes.model_input(path, images)
    assert x.dtype == np.float32 and x.shape == (1, 1, 2, 2)
    np.testing.assert_allclose(x[0, 0], [[-2.0, 2.0], [-1.2, 128 / 255 * 4 - 2]], atol=1e-6)


def test_model_input_gives_a_uint8_nhwc_model_its_pixels(tmp_path):
    path = _cnn_fp32(tmp_path / "m.onnx")
    images = np.arange(3 * 64, dtype=np.uint8).reshape(3, 1, 8, 8)
    x = runtimes.model_input(path, images)
    assert x.dtype == np.uint8 and x.shape == (3, 8, 8, 1)
    np.testing.assert_array_equal(x[..., 0], images[:, 0])


def test_model_input_refuses_float_images(tmp_path):
    path = linear_classifier(tmp_path / "m.onnx", (1, 2, 2))
    with pytest.raises(ValueError, match="uint8"):
        runtimes.model_input(path, np.zeros((1, 1, 2, 2), np.float32))


@pytest.mark.parametrize("preprocess", [True, False], ids=["uint8_nhwc", "float_nchw"])
def test_runtime_matrix_scores_every_runtime_at_each_batch_size(tmp_path, preprocess):
    # logit of class k = pixel k: the prediction is the brightest of the first three pixels
    weight = np.zeros((4, 3))
    weight[[0, 1, 2], [0, 1, 2]] = 1.0
    path = linear_classifier(tmp_path / "m.onnx", (1, 2, 2), weight=weight, preprocess=preprocess)
    rng = np.random.default_rng(0)
    images = rng.permutation(np.arange(5 * 4, dtype=np.uint8) * 12).reshape(5, 1, 2, 2)
    predicted = images.reshape(5, 4)[:, :3].argmax(1)
    labels = predicted.copy()
    labels[:2] = (labels[:2] + 1) % 3  # two of five wrong: accuracy 0.6
    matrix = runtimes.runtime_matrix({"m": path}, images, labels, batch_sizes=(1, 3))
    assert list(matrix["m"]) == list(runtimes.RUNTIMES)
    for cell in matrix["m"].values():
        assert cell == {
            "agreement_b1": 1.0,
            "accuracy_b1": 0.6,
            "agreement_b3": 1.0,
            "accuracy_b3": 0.6,
        }
    assert runtimes.matrix_failures(matrix) == []
    assert "| m | 100.0 % / 100.0 % |" in runtimes.matrix_table(matrix)


def test_matrix_failures_name_the_variant_runtime_and_batch():
    matrix = {
        "int8": {
            "opencv4": {"agreement_b1": 1.0, "agreement_b64": 0.87},
            "opencv5": {"error": "bufidx >= 0 in function 'argTensor'"},
            "onnxruntime": {"agreement_b1": 0.99, "agreement_b64": 1.0},
        }
    }
    assert runtimes.matrix_failures(matrix) == [
        "int8 in opencv4 at batch 64: agreement 0.8700 < 0.99",
        "int8 in opencv5: bufidx >= 0 in function 'argTensor'",
    ]


def test_unknown_runtime_and_missing_opencv_are_named(tmp_path, monkeypatch):
    path = linear_classifier(tmp_path / "m.onnx", (1, 2, 2))
    x = np.zeros((1, 1, 2, 2), np.float32)
    with pytest.raises(ValueError, match="runtime 'tvm'; expected one of onnxruntime"):
        runtimes.runtime_logits("tvm", path, x)
    monkeypatch.setattr(runtimes, "opencv_site", lambda major: tmp_path / f"opencv{major}")
    with pytest.raises(runtimes.RuntimeUnavailable, match="OpenCV 3.x.*make setup"):
        runtimes.opencv_logits(path, x, major=3)
