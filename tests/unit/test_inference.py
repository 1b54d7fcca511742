"""OnnxClassifier on exported digit models: every input kind, preprocessing, errors, the GPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import onnx_tools, paths
from pipeline.data import DeviceData, load_prepared
from pipeline.inference import InvalidImage, InvalidModel, OnnxClassifier
from pipeline.models import create_model
from tests.export_helpers import VARIANT_NAMES


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


def test_reads_labels_shape_and_normalisation_from_the_file(clf, project):
    info = json.loads((project / paths.DATASET_JSON).read_text())
    assert clf.classes == info["classes"] and clf.input_shape == (1, 8, 8)
    assert clf.mean.ravel().tolist() == pytest.approx(info["mean"])
    assert clf.provider == "CPUExecutionProvider" or torch.cuda.is_available()
    assert clf.metadata["variant"] == "int8"


def test_preprocessing_matches_the_training_normalisation(clf, project, digits):
    expected = DeviceData(load_prepared(project / paths.PREPARED_DIR), "cpu").x["test"].numpy()
    x = clf.preprocess(list(digits[0]))
    assert x.shape == expected.shape and x.dtype == np.float32
    np.testing.assert_allclose(x, expected, atol=1e-5)


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


def test_results_are_sorted_label_probability_pairs(clf, digits):
    (single,) = clf.predict(digits[0][0], top_k=3)  # one image, not a list: one result
    assert len(single) == 3 and all(isinstance(label, str) for label, _ in single)
    probabilities = [p for _, p in single]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0001
    (everything,) = clf.predict([digits[0][0]], top_k=50)  # clipped to the 10 classes
    assert sorted(label for label, _ in everything) == clf.classes
    assert sum(p for _, p in everything) == pytest.approx(1.0, abs=1e-5)
    assert clf.predict([]) == []
    with pytest.raises(ValueError, match="top_k"):
        clf.predict(digits[0][0], top_k=0)


def test_converts_mode_and_size_with_a_centre_crop(clf, digits):
    digit = digits[0][0]
    noise = np.random.default_rng(0).integers(0, 256, size=(8, 4), dtype=np.uint8)
    wide = np.hstack([noise, digit, noise])  # 8x16: the centre crop is the digit
    np.testing.assert_array_equal(clf.preprocess(wide), clf.preprocess(digit))
    gray = Image.new("RGB", (40, 40), (128, 128, 128))
    x = clf.preprocess(gray)
    assert x.shape == (1, 1, 8, 8)
    expected = np.broadcast_to((128 / 255 - clf.mean) / clf.std, x.shape)
    np.testing.assert_allclose(x, expected, rtol=1e-5)


def test_each_exported_variant_classifies_real_digits_quietly(project, digits, capfd):
    images, labels = digits
    for name in VARIANT_NAMES:
        model = OnnxClassifier(project / paths.exported_model(name), device="auto")
        accuracy = (_top1(model.predict(list(images), top_k=1)) == labels).mean()
        assert accuracy >= 0.9, (name, accuracy)
    assert "onnxruntime" not in capfd.readouterr().err.lower()


def test_bad_models_raise_one_line_naming_the_file(tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    net = create_model("cnn", 10, 1, 8, widths=(8,))
    bare = tmp_path / "bare.onnx"
    onnx_tools.export_onnx(net, bare, (1, 8, 8))
    meta = {"mean": [0.5], "std": [0.5], "input_layout": "NCHW"}
    three_names = tmp_path / "three_names.onnx"
    onnx_tools.export_onnx(
        net, three_names, (1, 8, 8), meta | {"classes": ["a", "b", "c"], "input_shape": [1, 8, 8]}
    )
    rgb_claim = tmp_path / "rgb_claim.onnx"
    rgb_meta = {"classes": list("0123456789"), "input_shape": [3, 8, 8]}
    rgb_meta |= {"mean": [0.5] * 3, "std": [0.5] * 3}
    onnx_tools.export_onnx(net, rgb_claim, (1, 8, 8), meta | rgb_meta)
    cases = {
        tmp_path / "missing.onnx": "model file not found",
        text: "not an ONNX model",
        bare: "without the pipeline's metadata (missing classes, mean, std, input_shape",
        three_names: "10 outputs but 3 class names",
        rgb_claim: "graph input [1, 8, 8] does not match the metadata's input_shape [3, 8, 8]",
    }
    for path, problem in cases.items():
        with pytest.raises(InvalidModel) as err:
            OnnxClassifier(path)
        message = str(err.value)
        assert message.startswith(f"{path}: ") and problem in message and "\n" not in message


def test_bad_images_raise_one_line_naming_the_image(clf, tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("not a png")
    cases = [
        (tmp_path / "missing.png", f"{tmp_path / 'missing.png'}: image file not found"),
        (fake, f"{fake}: not an image file Pillow can read"),
        (np.zeros((8, 8, 2), np.uint8), "image #0: array of shape (8, 8, 2); expected HxW"),
        (np.zeros((8, 8), np.float32), "image #0: array of dtype float32; expected uint8"),
        (42, "image #0: got int; expected a file path, a PIL image or a uint8 array"),
    ]
    for image, message in cases:
        with pytest.raises(InvalidImage) as err:
            clf.predict([image])
        assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU fallback")
def test_cuda_without_a_gpu_warns_and_runs_on_the_cpu(project, digits):
    with pytest.warns(UserWarning, match="no CUDA GPU works here; using the CPU"):
        model = OnnxClassifier(project / paths.exported_model("fp32"), device="cuda")
    assert model.provider == "CPUExecutionProvider"
    assert len(model.predict(digits[0][0])) == 1
    assert onnx_tools.gpu_providers() == []
    with pytest.raises(ValueError, match="device: got 'tpu'"):
        OnnxClassifier(project / paths.exported_model("fp32"), device="tpu")
