"""OnnxClassifier: probabilities, ranking, model checks and the device on linear ONNX graphs
(fast), and on the models a real export wrote (integration)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import inference, onnx_tools, paths
from pipeline.checkpoint import load_checkpoint
from pipeline.data import DeviceData, load_prepared
from pipeline.inference import DeviceFallbackWarning, InvalidModel, OnnxClassifier
from tests.export_helpers import VARIANT_NAMES
from tests.tiny_onnx import linear_classifier


@pytest.fixture(scope="module")
def digits(project):
    """(uint8 HxW test images, labels) of the prepared test split."""
    images, labels = load_prepared(project / paths.PREPARED_DIR).splits["test"]
    return images[:, 0].numpy(), labels.numpy()


@pytest.fixture(scope="module")
def clf(project):
    return OnnxClassifier(project / paths.exported_model("int8"))


def _top1(results) -> np.ndarray:
    return np.array([int(r[0][0]) for r in results])


@pytest.mark.integration
def test_reads_labels_shape_and_normalisation_from_the_file(clf, project):
    info = json.loads((project / paths.DATASET_JSON).read_text())
    assert clf.classes == info["classes"] and clf.input_shape == (1, 8, 8)
    assert clf.mean.ravel().tolist() == pytest.approx(info["mean"])
    assert clf.metadata["variant"] == "int8"


@pytest.mark.integration
def test_preprocessing_gives_the_prepared_pixels(clf, project, digits):
    images = load_prepared(project / paths.PREPARED_DIR).splits["test"][0]
    x = clf.preprocess(list(digits[0]))
    assert x.dtype == np.uint8
    np.testing.assert_array_equal(x, onnx_tools.pixels_nhwc(images))


@pytest.mark.integration
def test_exported_fp32_graphs_give_the_pytorch_logits_from_pixels(project):
    """The exported graph normalises uint8 pixels itself: its logits equal the PyTorch
    checkpoint's on the same images normalised by DeviceData (the training input)."""
    data = DeviceData(load_prepared(project / paths.PREPARED_DIR), "cpu")
    for name, ckpt in (("fp32", paths.TUNED_CKPT), ("pruned_fp32", paths.PRUNED_CKPT)):
        model, _ = load_checkpoint(project / ckpt)
        with torch.no_grad():
            expected = model(data.x["test"]).numpy()
        clf = OnnxClassifier(project / paths.exported_model(name))
        logits = onnx_tools.run_logits(clf.session, onnx_tools.pixels_nhwc(data.images["test"]))
        np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)


@pytest.mark.integration
def test_every_input_kind_gives_the_same_predictions(clf, digits, tmp_path):
    images, labels = digits[0][:40], digits[1][:40]
    files = []
    for i, image in enumerate(images):
        files.append(tmp_path / f"digit_{i}.png")
        Image.fromarray(image).save(files[-1])
    np.save(tmp_path / "digit_0.npy", images[0])
    kinds = {
        "str paths": [str(f) for f in files],
        "Path objects": files,
        "PIL images": [Image.open(f) for f in files],
        "HxW arrays": list(images),
        "HxWx1 arrays": [a[:, :, None] for a in images],
        "HxWx3 arrays": [np.repeat(a[:, :, None], 3, axis=2) for a in images],
        "HxWx4 arrays": [np.dstack([a, a, a, np.full_like(a, 255)]) for a in images],
    }
    reference = _top1(clf.predict(list(images), top_k=1))
    assert (reference == labels).mean() >= 0.9
    for kind, inputs in kinds.items():
        assert (_top1(clf.predict(inputs, top_k=1)) == reference).all(), kind
    mixed = [files[0], Image.open(files[1]), images[2], tmp_path / "digit_0.npy"]
    assert _top1(clf.predict(mixed, top_k=1)).tolist() == [*reference[:3], reference[0]]


@pytest.mark.integration
def test_each_exported_variant_classifies_real_digits_quietly(project, digits, capfd):
    images, labels = digits
    for name in VARIANT_NAMES:
        model = OnnxClassifier(project / paths.exported_model(name), device="auto")
        accuracy = (_top1(model.predict(list(images), top_k=1)) == labels).mean()
        assert accuracy >= 0.9, (name, accuracy)
    assert "onnxruntime" not in capfd.readouterr().err.lower()


# ---- fast: linear ONNX graphs whose logits are known exactly (tests/tiny_onnx.py) ----


def test_probabilities_are_the_softmax_of_the_logits(tmp_path):
    # zero weights: the logits are the bias, log(1), log(2), log(5): probabilities 1/8, 2/8, 5/8
    path = linear_classifier(tmp_path / "m.onnx", bias=np.log([1.0, 2.0, 5.0]))
    clf = OnnxClassifier(path)
    proba = clf.predict_proba([np.zeros((4, 4), np.uint8)] * 2)
    assert proba.shape == (2, 3) and proba.dtype == np.float32
    np.testing.assert_allclose(proba, [[0.125, 0.25, 0.625]] * 2, rtol=1e-6)
    assert clf.predict(np.zeros((4, 4), np.uint8), top_k=2) == [
        [("c", pytest.approx(0.625)), ("b", pytest.approx(0.25))]
    ]


def test_huge_logits_do_not_overflow(tmp_path):
    path = linear_classifier(tmp_path / "m.onnx", bias=[1000.0, 0.0, -1000.0])
    proba = OnnxClassifier(path).predict_proba(np.zeros((4, 4), np.uint8))
    np.testing.assert_array_equal(proba, [[1.0, 0.0, 0.0]])


def test_each_image_is_ranked_by_its_own_logits(tmp_path):
    # class a scores the mean brightness, class b its opposite, class c nothing
    weight = np.zeros((16, 3))
    weight[:, 0], weight[:, 1] = 1 / 16, -1 / 16
    clf = OnnxClassifier(linear_classifier(tmp_path / "m.onnx", weight=weight, classes="abc"))
    white, black = np.full((4, 4), 255, np.uint8), np.zeros((4, 4), np.uint8)
    (bright, dark) = clf.predict([white, black], top_k=3)
    e = np.exp([1.0, -1.0, 0.0])
    assert [label for label, _ in bright] == ["a", "c", "b"]
    assert [p for _, p in bright] == pytest.approx(sorted(e / e.sum(), reverse=True), rel=1e-6)
    # a tie keeps the classes' order
    assert [label for label, _ in dark] == ["a", "b", "c"]
    assert [p for _, p in dark] == pytest.approx([1 / 3] * 3)


def test_top_k_is_clipped_to_the_classes_and_must_be_a_positive_integer(tmp_path):
    clf = OnnxClassifier(linear_classifier(tmp_path / "m.onnx", bias=[3.0, 2.0, 1.0]))
    image = np.zeros((4, 4), np.uint8)
    assert [label for label, _ in clf.predict(image, top_k=50)[0]] == ["a", "b", "c"]
    assert [label for label, _ in clf.predict(image, top_k=1)[0]] == ["a"]
    assert len(clf.predict(image)[0]) == 3  # default 5, clipped to 3
    for bad in (0, -1, True, 1.5, "2"):
        with pytest.raises(ValueError, match=f"^top_k: got {bad!r}; expected an integer >= 1$"):
            clf.predict(image, top_k=bad)
    assert clf.predict([]) == []
    assert clf.predict_proba([]).shape == (0, 3) and clf.predict_proba([]).dtype == np.float32


def test_batches_give_the_same_result_as_one_call(tmp_path):
    weight = np.random.default_rng(0).normal(size=(16, 3))
    path = linear_classifier(tmp_path / "m.onnx", weight=weight)
    images = list(np.random.default_rng(1).integers(0, 256, (5, 4, 4), dtype=np.uint8))
    whole = OnnxClassifier(path).predict_proba(images)
    in_twos = OnnxClassifier(path, batch_size=2).predict_proba(images)
    np.testing.assert_array_equal(in_twos, whole)
    logits = np.stack(images).reshape(5, 16).astype(np.float64) / 255 @ weight
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(whole, expected, rtol=1e-5)


def test_reads_classes_shape_normalisation_and_metadata_from_the_file(tmp_path):
    path = linear_classifier(
        tmp_path / "m.onnx",
        (3, 2, 5),
        classes=[0, 1, 2],
        mean=[0.1, 0.2, 0.3],
        std=[0.4, 0.5, 0.6],
        metadata={"accuracy": 0.97},
    )
    clf = OnnxClassifier(path)
    assert clf.classes == ["0", "1", "2"] and clf.input_shape == (3, 2, 5)
    assert clf.mean.shape == clf.std.shape == (1, 3, 1, 1) and clf.mean.dtype == np.float32
    assert clf.mean.ravel().tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert clf.std.ravel().tolist() == pytest.approx([0.4, 0.5, 0.6])
    assert clf.metadata["variant"] == "linear" and clf.metadata["accuracy"] == "0.97"
    assert clf.path == path and clf.batch_size == 64
    assert repr(clf) == (
        f"OnnxClassifier({str(path)!r}, classes=3, input=(3, 2, 5), provider=CPUExecutionProvider)"
    )


def _bad_models(tmp_path) -> dict:
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    model = linear_classifier  # every case below: an otherwise valid 1 x 4 x 4 model
    return {
        tmp_path / "missing.onnx": "model file not found",
        tmp_path: "model file not found",
        text: "not an ONNX model (",
        empty: "not an ONNX model (",
        model(tmp_path / "bare.onnx", drop=("classes", "std", "input_layout")): (
            "ONNX model without the pipeline's metadata (missing classes, std, input_layout); "
            "use a model written by `pipeline export`"
        ),
        model(tmp_path / "json.onnx", metadata={"mean": "[0.5"}): "unreadable metadata value (",
        model(tmp_path / "nchw.onnx", metadata={"input_layout": "NCHW"}): (
            "unsupported input NCHW [1, 4, 4]; expected NHWC with 1 or 3 channels"
        ),
        model(tmp_path / "two.onnx", metadata={"input_shape": [2, 4, 4]}): (
            "unsupported input NHWC [2, 4, 4]; expected NHWC with 1 or 3 channels"
        ),
        model(tmp_path / "flat.onnx", metadata={"input_shape": [1, 16]}): (
            "unsupported input NHWC [1, 16]; expected NHWC with 1 or 3 channels"
        ),
        model(tmp_path / "old.onnx", preprocess=False): (
            "metadata format 'pipeline.onnx/1'; this version reads 'pipeline.onnx/2' (uint8 "
            "NHWC pixels, normalised in the graph); export the model again with `dvc repro "
            "export`"
        ),
        model(tmp_path / "noformat.onnx", drop=("format",)): (
            "ONNX model without the pipeline's metadata (missing format)"
        ),
        model(
            tmp_path / "float.onnx",
            (1, 1, 1),
            preprocess=False,
            metadata={"format": inference.METADATA_FORMAT, "input_layout": "NHWC"},
        ): "graph input of type tensor(float); expected tensor(uint8) pixels",
        model(tmp_path / "mean.onnx", metadata={"mean": [0.5, 0.5]}): (
            "mean / std do not match 1 input channels"
        ),
        model(tmp_path / "std.onnx", metadata={"std": [0.5, 0.5, 0.5]}): (
            "mean / std do not match 1 input channels"
        ),
        model(tmp_path / "names.onnx", metadata={"classes": ["a", "b"]}): (
            "3 outputs but 2 class names"
        ),
        model(tmp_path / "size.onnx", graph_input_shape=(1, 4, 5)): (
            "graph input [4, 5, 1] does not match the metadata's input_shape [1, 4, 4] in "
            "layout NHWC"
        ),
        model(tmp_path / "rgb.onnx", graph_input_shape=(3, 4, 4)): (
            "graph input [4, 4, 3] does not match the metadata's input_shape [1, 4, 4]"
        ),
        model(tmp_path / "rank.onnx", graph_input_shape=(16,)): (
            "graph input [16] does not match the metadata's input_shape [1, 4, 4]"
        ),
    }


def test_bad_models_raise_one_line_naming_the_file(tmp_path):
    for path, problem in _bad_models(tmp_path).items():
        with pytest.raises(InvalidModel) as err:
            OnnxClassifier(path)
        message = str(err.value)
        assert message.startswith(f"{path}: {problem}"), (path.name, message)
        assert "\n" not in message and len(message) < len(str(path)) + 250
        assert isinstance(err.value, ValueError)


def test_an_unknown_device_is_refused(tmp_path):
    path = linear_classifier(tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="^device: got 'tpu'; expected one of auto, cpu, cuda$"):
        OnnxClassifier(path, device="tpu")
    with pytest.raises(ValueError, match="^device: got 'tpu'"):
        OnnxClassifier(tmp_path / "missing.onnx", device="tpu")  # checked before the file


def test_without_a_gpu_cuda_warns_and_runs_on_the_cpu(tmp_path, monkeypatch, recwarn):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine, or a GPU one
    path = linear_classifier(tmp_path / "m.onnx", bias=[0.0, 1.0, 0.0])
    assert onnx_tools.gpu_providers() == []
    for device in ("auto", "cpu"):
        assert OnnxClassifier(path, device=device).provider == "CPUExecutionProvider"
    assert len(recwarn) == 0
    message = f"{path}: device cuda requested but no CUDA GPU works here; using the CPU"
    with pytest.warns(DeviceFallbackWarning) as caught:
        clf = OnnxClassifier(path, device="cuda")
    assert [str(w.message) for w in caught] == [message]
    assert caught[0].filename != inference.__file__  # stacklevel: it points at the caller
    assert clf.provider == "CPUExecutionProvider"
    assert clf.predict(np.zeros((4, 4), np.uint8), top_k=1)[0][0][0] == "b"


def test_pixels_are_fed_as_uint8_and_float_arrays_are_refused(tmp_path):
    weight = np.random.default_rng(0).normal(size=(16, 3))
    clf = OnnxClassifier(linear_classifier(tmp_path / "m.onnx", weight=weight))
    assert clf.session.get_inputs()[0].type == "tensor(uint8)"
    pixels = clf.preprocess(np.arange(16, dtype=np.uint8).reshape(4, 4))
    assert pixels.dtype == np.uint8 and pixels.shape == (1, 4, 4, 1)
    with pytest.raises(ValueError, match=r"^the model takes uint8 pixels \(N x H x W x C\); got"):
        onnx_tools.run_logits(clf.session, pixels.astype(np.float32) / 255)
