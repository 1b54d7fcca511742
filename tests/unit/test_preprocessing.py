"""Inference preprocessing equals the prepare stage's decoding, on images of any size and mode.

The training images of an `imagefolder` dataset are decoded by `pipeline.data` (mode, centre
crop, bilinear resize to uint8) and normalised by `DeviceData`; `OnnxClassifier.preprocess`
must turn the same files into the same uint8 pixels, and the graph's own preprocessing
(`onnx_tools.add_preprocessing`) must normalise them as `DeviceData` does, or a deployed model
sees other inputs than it was trained on. The models here are linear ONNX graphs
(`tests/tiny_onnx.py`, preprocessing included): milliseconds.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from pipeline import onnx_tools
from pipeline.data import DeviceData, Prepared, load_image_folder
from pipeline.inference import OnnxClassifier
from pipeline.models import create_model
from tests.tiny_onnx import linear_classifier

# (width, height): wide, tall, tiny, already the model's size, extreme, large, a single pixel
SIZES = [(40, 23), (23, 40), (9, 7), (12, 12), (3, 50), (64, 64), (1, 1)]
GRAY_MODES = ["L", "1", "LA", "I;16", "I", "F"]
COLOUR_MODES = ["RGB", "RGBA", "P", "CMYK", "L", "LA", "1", "I;16"]
SUFFIX = {"CMYK": ".jpg", "I": ".tif", "F": ".tif"}  # formats that can hold these modes


def _image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    if mode in ("I;16", "I"):
        return Image.fromarray(rng.integers(0, 600, (h, w)).astype(np.uint16)).convert(mode)
    if mode == "F":
        return Image.fromarray(rng.uniform(0, 300, (h, w)).astype(np.float32))
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return rgb.convert(mode)


def _folder(root, modes: list[str]) -> list:
    """An image folder (classes a, b) of every mode at every size; the files in prepare's
    order (class folders sorted, then file names sorted)."""
    files = []
    for i, (mode, size) in enumerate((m, s) for m in modes for s in SIZES):
        folder = root / ("a" if i % 2 == 0 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:03d}_{mode.replace(';', '')}{SUFFIX.get(mode, '.png')}"
        _image(mode, size, seed=i).save(path)
        files.append(path)
    return sorted(files, key=lambda p: (p.parent.name, p.name))


@pytest.mark.parametrize(("modes", "channels"), [(GRAY_MODES, 1), (COLOUR_MODES, 3)])
def test_inference_pixels_equal_prepare_pixels_on_every_size_and_mode(tmp_path, modes, channels):
    size = 12
    files = _folder(tmp_path / "images", modes)
    raw = load_image_folder(tmp_path / "images", size)
    assert raw.images.shape == (len(files), channels, size, size)
    clf = OnnxClassifier(linear_classifier(tmp_path / "m.onnx", (channels, size, size)))
    pixels = clf.preprocess(files)  # what the model is fed: uint8, N x H x W x C
    assert pixels.dtype == np.uint8 and pixels.shape == (len(files), size, size, channels)
    np.testing.assert_array_equal(pixels, raw.images.transpose(0, 2, 3, 1))


@pytest.mark.parametrize(("modes", "channels"), [(GRAY_MODES, 1), (COLOUR_MODES, 3)])
def test_inference_input_equals_the_normalised_training_input(tmp_path, modes, channels):
    size = 12
    files = _folder(tmp_path / "images", modes)
    raw = load_image_folder(tmp_path / "images", size)
    mean, std = [0.2, 0.5, 0.7][:channels], [0.3, 0.25, 0.125][:channels]
    split = (torch.from_numpy(raw.images), torch.from_numpy(raw.labels))
    training = DeviceData(Prepared({"train": split}, {"mean": mean, "std": std}), "cpu")
    clf = _identity_model(tmp_path, (channels, size, size), mean, std)
    np.testing.assert_allclose(
        _normalised(clf, files), training.x["train"].numpy(), rtol=0, atol=1e-6
    )


def _identity_model(tmp_path, shape, mean, std) -> OnnxClassifier:
    """A linear model whose logits are its input after the graph's preprocessing, flattened
    (C, H, W): the normalised image, as the first layer of an exported model sees it."""
    n = int(np.prod(shape))
    classes = [str(i) for i in range(n)]
    path = linear_classifier(
        tmp_path / "identity.onnx", shape, classes, weight=np.eye(n), mean=mean, std=std
    )
    return OnnxClassifier(path)


def _normalised(clf: OnnxClassifier, images) -> np.ndarray:
    """What the model's first layer reads for `images`: preprocess, then the graph's own
    scaling and normalisation (float32 N x C x H x W)."""
    logits = onnx_tools.run_logits(clf.session, clf.preprocess(images))
    return logits.reshape(-1, *clf.input_shape)


def _gray_model(tmp_path, **kwargs) -> OnnxClassifier:
    return OnnxClassifier(linear_classifier(tmp_path / "gray.onnx", (1, 8, 8), **kwargs))


def test_the_graph_scales_and_normalises_with_its_mean_and_std(tmp_path):
    clf = _identity_model(tmp_path, (1, 8, 8), mean=[0.5], std=[0.25])
    pixels = clf.preprocess(Image.new("RGB", (40, 40), (128, 128, 128)))
    assert pixels.dtype == np.uint8 and pixels.shape == (1, 8, 8, 1) and (pixels == 128).all()
    x = _normalised(clf, Image.new("RGB", (40, 40), (128, 128, 128)))
    assert x.shape == (1, 1, 8, 8) and x.dtype == np.float32
    np.testing.assert_allclose(x, (128 / 255 - 0.5) / 0.25, atol=1e-6)  # about 0.0078
    np.testing.assert_allclose(_normalised(clf, np.full((8, 8), 255, np.uint8)), 2.0, atol=1e-6)
    np.testing.assert_allclose(_normalised(clf, np.zeros((8, 8), np.uint8)), -2.0, atol=1e-6)


def test_colour_channels_keep_their_order_and_own_statistics(tmp_path):
    clf = _identity_model(tmp_path, (3, 2, 2), mean=[0.0, 0.1, 0.2], std=[1.0, 0.5, 0.25])
    image = np.zeros((2, 2, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 51, 102, 153  # 0.2, 0.4, 0.6 of 255
    np.testing.assert_array_equal(clf.preprocess(image), image[None])  # fed as it is
    x = _normalised(clf, image)
    assert x.shape == (1, 3, 2, 2)
    for channel, value in enumerate([0.2, (0.4 - 0.1) / 0.5, (0.6 - 0.2) / 0.25]):
        np.testing.assert_allclose(x[0, channel], value, rtol=1e-6)
    gray_in_rgb = _normalised(clf, np.full((2, 2), 51, np.uint8))
    np.testing.assert_allclose(gray_in_rgb[0, 2], (0.2 - 0.2) / 0.25, atol=1e-6)


def test_other_aspect_ratios_are_centre_cropped(tmp_path):
    clf = _gray_model(tmp_path)
    rng = np.random.default_rng(0)
    digit = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    noise = rng.integers(0, 256, (8, 4), dtype=np.uint8)
    wide = np.hstack([noise, digit, noise])  # 8 x 16: the centre 8 x 8 is the digit
    tall = np.vstack([noise.T, digit, noise.T])  # 16 x 8
    np.testing.assert_array_equal(clf.preprocess(wide)[0, :, :, 0], digit)
    np.testing.assert_array_equal(clf.preprocess(tall)[0, :, :, 0], digit)
    np.testing.assert_array_equal(clf.preprocess(digit)[0, :, :, 0], digit)  # right size: kept


def test_a_model_that_is_not_square_gets_its_own_height_and_width(tmp_path):
    clf = OnnxClassifier(linear_classifier(tmp_path / "wide.onnx", (1, 4, 8)))
    rows = np.repeat(np.arange(0, 240, 30, dtype=np.uint8)[:, None], 16, axis=1)  # 8 x 16
    x = clf.preprocess(rows)
    assert x.shape == (1, 4, 8, 1)
    pixels = x[0, :, :, 0].astype(int)
    assert (np.diff(pixels, axis=1) == 0).all()  # rows stay rows: constant along the width
    assert (np.diff(pixels[:, 0]) > 0).all()  # and get brighter downwards, as in the image
    square = np.zeros((20, 20), np.uint8)
    square[1:19, :] = 200  # black only in the first and the last row
    # the crop keeps the centre 20 x 10 (and the filter reads a few rows around it): no black
    cropped = clf.preprocess(square)[0, :, :, 0]
    np.testing.assert_array_equal(cropped, 200)


def test_every_input_kind_gives_the_same_array(tmp_path):
    clf = _gray_model(tmp_path)
    image = np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8)
    png = tmp_path / "digit.png"
    Image.fromarray(image).save(png)
    np.save(tmp_path / "digit.npy", image)
    (tmp_path / "upper.NPY").write_bytes((tmp_path / "digit.npy").read_bytes())
    kinds = {
        "str path": str(png),
        "Path": png,
        "PIL image": Image.open(png),
        "HxW array": image,
        "HxWx1 array": image[:, :, None],
        "HxWx3 array": np.repeat(image[:, :, None], 3, axis=2),
        "HxWx4 array": np.dstack([image, image, image, np.full_like(image, 255)]),
        "non-contiguous array": np.asfortranarray(image),
        ".npy file": tmp_path / "digit.npy",
        ".NPY file": str(tmp_path / "upper.NPY"),
    }
    expected = image[None, :, :, None]  # uint8, N x H x W x C
    for kind, value in kinds.items():
        np.testing.assert_array_equal(clf.preprocess(value), expected, err_msg=kind)
        np.testing.assert_array_equal(clf.preprocess([value]), expected, err_msg=kind)
    batch = clf.preprocess((png, image, tmp_path / "digit.npy"))  # a tuple is a batch too
    np.testing.assert_array_equal(batch, np.concatenate([expected] * 3))
    assert clf.preprocess([]).shape == (0, 8, 8, 1) and clf.preprocess([]).dtype == np.uint8


def _bad_image_cases(tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("not a png")
    truncated = tmp_path / "truncated.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    text_npy = tmp_path / "text.npy"
    text_npy.write_text("not an array")
    pickled_npy = tmp_path / "pickled.npy"  # an object array: loading it would unpickle
    np.save(pickled_npy, np.array([{"not": "pixels"}], dtype=object), allow_pickle=True)
    float_npy = tmp_path / "float.npy"
    np.save(float_npy, np.zeros((8, 8)))
    missing = tmp_path / "missing.png"
    return [
        (missing, f"{missing}: image file not found"),
        (str(missing), f"{missing}: image file not found"),
        (tmp_path, f"{tmp_path}: a folder, not an image file"),
        (fake, f"{fake}: not an image file Pillow can read"),
        (truncated, f"{truncated}: unreadable image ("),
        (text_npy, f"{text_npy}: unreadable .npy array ("),
        (pickled_npy, f"{pickled_npy}: unreadable .npy array (Object arrays cannot be loaded"),
        (float_npy, f"{float_npy}: array of dtype float64; expected uint8 (0..255)"),
        (np.zeros((8, 8, 2), np.uint8), "image #0: array of shape (8, 8, 2); expected HxW or"),
        (np.zeros((8, 8, 5), np.uint8), "image #0: array of shape (8, 8, 5); expected HxW or"),
        (np.zeros(8, np.uint8), "image #0: array of shape (8,); expected HxW or HxWxC with C"),
        (np.zeros((1, 8, 8, 1), np.uint8), "image #0: array of shape (1, 8, 8, 1); expected"),
        (np.zeros((8, 8), np.float32), "image #0: array of dtype float32; expected uint8"),
        (42, "image #0: got int; expected a file path, a PIL image or a uint8 array"),
    ]


def test_bad_images_raise_one_line_naming_the_image(tmp_path):
    clf = _gray_model(tmp_path)
    for image, message in _bad_image_cases(tmp_path):
        with pytest.raises(ValueError) as err:  # InvalidImage is a ValueError too
            clf.preprocess(image)
        assert type(err.value).__name__ == "InvalidImage"
        text = str(err.value)
        assert text.startswith(message), (message, text)
        assert "\n" not in text
    with pytest.raises(ValueError, match=r"^image #2: got NoneType; expected"):
        clf.preprocess([np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8), None])


def test_an_image_mode_that_cannot_be_converted_is_named(tmp_path):
    clf = _gray_model(tmp_path)
    odd = Image.new("La", (8, 8))  # Pillow has no La -> L conversion
    with pytest.raises(ValueError, match=r"^image #0: cannot convert mode La \(") as err:
        clf.preprocess([odd])
    assert type(err.value).__name__ == "InvalidImage"


@pytest.mark.slow  # a real torch.onnx export: seconds
def test_an_exported_model_gives_the_pytorch_logits_of_the_normalised_pixels(tmp_path):
    """`onnx_tools.export_onnx`, the one graph builder: uint8 H x W x C pixels in, the same
    logits as the PyTorch model on the images `DeviceData` normalised (RGB, not square, so a
    swapped axis or channel cannot pass)."""
    mean, std = [0.2, 0.5, 0.7], [0.3, 0.25, 0.125]
    torch.manual_seed(0)
    model = create_model("cnn", 4, 3, 12, widths=(8,)).eval()
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (20, 3, 12, 10), np.uint8))
    split = (images, torch.zeros(20, dtype=torch.int64))
    data = DeviceData(Prepared({"test": split}, {"mean": mean, "std": std}), "cpu")
    path = tmp_path / "cnn.onnx"
    proto = onnx_tools.export_onnx(model, path, (3, 12, 10), mean=mean, std=std)
    pixels_type = proto.graph.input[0].type.tensor_type
    assert pixels_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value or d.dim_param for d in pixels_type.shape.dim] == ["batch", 12, 10, 3]
    session, _ = onnx_tools.make_session(path, "cpu")
    logits = onnx_tools.run_logits(session, onnx_tools.pixels_nhwc(images))
    with torch.no_grad():
        expected = model(data.x["test"]).numpy()
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="^the model takes uint8 pixels .*; got a float32 array"):
        onnx_tools.run_logits(session, data.x["test"].numpy())  # never normalised twice
