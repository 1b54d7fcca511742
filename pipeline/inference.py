"""Classify images with an exported ONNX model; preprocessing and labels come from the file.

    from pipeline.inference import OnnxClassifier
    clf = OnnxClassifier("exported_models/model_int8.onnx")      # device="auto" | "cpu" | "cuda"
    clf.predict(["seven.png", pil_image, uint8_array], top_k=3)  # -> [[("7", 0.98), ...], ...]

Every exported graph takes uint8 pixels, batch x H x W x C (NHWC: the layout of
`np.asarray(pil_image)`), and scales and normalises them itself (`onnx_tools.add_preprocessing`).
Its `metadata_props` hold what a caller needs (see `REQUIRED_METADATA`): the class names, the
image shape (C, H, W), the layout (NHWC), the format (`METADATA_FORMAT`; files of the older
format, whose graphs took normalised floats, are refused with a one-line message: export them
again) and, for information, the training mean / std. An image (a file path, a PIL image, or an
HxW / HxWxC uint8 array; `.npy` files hold such arrays) is converted to the model's mode
(grayscale or RGB), centre-cropped to the model's aspect ratio and resized (bilinear, as the
prepare stage does), and fed as uint8. Bad input raises `InvalidModel` / `InvalidImage`
(`pipeline.errors.UserError`, also `ValueError`) with one line naming the file and the problem.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import onnx_tools
from pipeline.errors import UserError

# /2: the graph takes uint8 NHWC pixels and normalises them itself (/1: normalised float NCHW)
METADATA_FORMAT = "pipeline.onnx/2"
INPUT_LAYOUT = "NHWC"
# Keys inference cannot do without (all JSON values except input_layout and format).
REQUIRED_METADATA = ("classes", "mean", "std", "input_shape", "input_layout", "format")
DEVICES = ("auto", "cpu", "cuda")

ImageInput = Any  # str | Path | PIL.Image.Image | np.ndarray


class InvalidModel(UserError, ValueError):
    """A model file that is missing, not ONNX, or lacks the pipeline's metadata."""


class InvalidImage(UserError, ValueError):
    """An image that is missing, unreadable, or of a shape / type inference cannot use."""


class DeviceFallbackWarning(UserWarning):
    """`device="cuda"` was asked for but no CUDA GPU works here: running on the CPU."""


def _image_name(image: ImageInput, index: int) -> str:
    return str(image) if isinstance(image, (str, Path)) else f"image #{index}"


def _parse_metadata(path: Path, meta: dict[str, str]) -> dict:
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise InvalidModel(
            f"{path}: ONNX model without the pipeline's metadata (missing "
            f"{', '.join(missing)}); use a model written by `pipeline export`"
        )
    if meta["format"] != METADATA_FORMAT:  # older files take normalised floats: refused
        raise InvalidModel(
            f"{path}: metadata format {meta['format']!r}; this version reads "
            f"{METADATA_FORMAT!r} (uint8 NHWC pixels, normalised in the graph); export the "
            f"model again with `dvc repro export`"
        )
    try:
        parsed = {k: json.loads(meta[k]) for k in ("classes", "mean", "std", "input_shape")}
    except json.JSONDecodeError as err:
        raise InvalidModel(f"{path}: unreadable metadata value ({err})") from None
    _check_metadata_types(path, parsed)
    channels = parsed["input_shape"][0]
    layout = meta["input_layout"]
    if layout != INPUT_LAYOUT or len(parsed["input_shape"]) != 3 or channels not in (1, 3):
        raise InvalidModel(
            f"{path}: unsupported input {layout} {parsed['input_shape']}; "
            f"expected {INPUT_LAYOUT} with 1 or 3 channels"
        )
    if len(parsed["mean"]) != channels or len(parsed["std"]) != channels:
        raise InvalidModel(f"{path}: mean / std do not match {channels} input channels")
    return parsed


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)


def _is_name(x) -> bool:
    return isinstance(x, str) or _is_number(x)


# metadata key -> (predicate on its JSON value, what is allowed)
_METADATA_TYPES = {
    "classes": (
        lambda v: isinstance(v, list) and len(v) > 0 and all(_is_name(c) for c in v),
        "a non-empty list of class names (strings or numbers)",
    ),
    "input_shape": (  # its length and channel count are checked with the layout
        lambda v: (
            isinstance(v, list)
            and len(v) > 0
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in v)
        ),
        "a list of integers >= 1 (C, H, W)",
    ),
    "mean": (
        lambda v: isinstance(v, list) and len(v) > 0 and all(_is_number(m) for m in v),
        "a list of numbers, one per channel",
    ),
    "std": (
        lambda v: isinstance(v, list) and len(v) > 0 and all(_is_number(s) and s > 0 for s in v),
        "a list of numbers > 0, one per channel",
    ),
}


def _check_metadata_types(path: Path, parsed: dict) -> None:
    """Raise InvalidModel naming the key when a metadata value has the wrong type or shape."""
    for key, (valid, allowed) in _METADATA_TYPES.items():
        if not valid(parsed[key]):
            shown = json.dumps(parsed[key])
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise InvalidModel(f"{path}: metadata {key}: got {shown}; expected {allowed}")


class OnnxClassifier:
    """An exported classifier: ONNX Runtime session, the image size and labels in its metadata.

    Args:
        path: an ONNX file written by the export stage.
        device: `auto` (CUDA when a GPU works, else CPU), `cpu` or `cuda` (falls back to the
            CPU with a warning when there is no GPU).
        batch_size: images per ONNX Runtime call.

    Attributes: `classes`, `input_shape` (C, H, W), `mean`, `std` (for information: the graph
    normalises), `provider` (the execution provider that really runs), `metadata` (every
    `metadata_props` entry, as strings).

    Raises:
        InvalidModel: missing file, not an ONNX model, no pipeline metadata, or metadata of an
            older format (its graph would expect normalised floats).
    """

    def __init__(self, path: str | Path, device: str = "auto", batch_size: int = 64):
        if device not in DEVICES:
            raise ValueError(f"device: got {device!r}; expected one of {', '.join(DEVICES)}")
        self.path = Path(path)
        if not self.path.is_file():
            raise InvalidModel(f"{self.path}: model file not found")
        try:
            self.session, self.provider = onnx_tools.make_session(self.path, device)
        except Exception as err:  # ONNX Runtime raises its own types (InvalidProtobuf, Fail...)
            raise InvalidModel(f"{self.path}: not an ONNX model ({_ort_reason(err)})") from None
        if device == "cuda" and self.provider == "CPUExecutionProvider":
            warnings.warn(
                f"{self.path}: device cuda requested but no CUDA GPU works here; using the CPU",
                DeviceFallbackWarning,
                stacklevel=2,
            )
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        parsed = _parse_metadata(self.path, self.metadata)
        self.classes: list[str] = [str(c) for c in parsed["classes"]]
        self.input_shape: tuple[int, int, int] = tuple(int(d) for d in parsed["input_shape"])
        self.mean = np.asarray(parsed["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
        self.std = np.asarray(parsed["std"], dtype=np.float32).reshape(1, -1, 1, 1)
        self.batch_size = batch_size
        self._check_graph()

    def _check_graph(self) -> None:
        """The graph's input (uint8, N x H x W x C) and output sizes must match the metadata
        (fixed dims only)."""
        graph_input = self.session.get_inputs()[0]
        input_dims = graph_input.shape[1:]
        output_dims = self.session.get_outputs()[0].shape[1:]
        channels, height, width = self.input_shape
        fixed = [(a, b) for a, b in zip(input_dims, (height, width, channels), strict=False)]
        if len(input_dims) != 3 or any(isinstance(a, int) and a != b for a, b in fixed):
            raise InvalidModel(
                f"{self.path}: graph input {input_dims} does not match the metadata's "
                f"input_shape {list(self.input_shape)} in layout {INPUT_LAYOUT}"
            )
        if graph_input.type != "tensor(uint8)":
            raise InvalidModel(
                f"{self.path}: graph input of type {graph_input.type}; expected tensor(uint8) "
                f"pixels"
            )
        if (
            output_dims
            and isinstance(output_dims[-1], int)
            and output_dims[-1] != len(self.classes)
        ):
            raise InvalidModel(
                f"{self.path}: {output_dims[-1]} outputs but {len(self.classes)} class names"
            )

    def __repr__(self) -> str:
        return (
            f"OnnxClassifier({str(self.path)!r}, classes={len(self.classes)}, "
            f"input={self.input_shape}, provider={self.provider})"
        )

    def _to_pil(self, image: ImageInput, name: str):
        from PIL import Image, UnidentifiedImageError

        if isinstance(image, Image.Image):
            return _usable(image, name)
        if isinstance(image, (str, Path)):
            path = Path(image)
            if path.is_dir():
                raise InvalidImage(f"{path}: a folder, not an image file")
            if not path.is_file():
                raise InvalidImage(f"{path}: image file not found")
            if path.suffix.lower() == ".npy":
                try:
                    array = np.load(path, allow_pickle=False)
                except (OSError, ValueError) as err:
                    raise InvalidImage(f"{path}: unreadable .npy array ({err})") from None
                return self._to_pil(array, name)
            try:
                with Image.open(path) as img:
                    img.load()
                    return _usable(img.copy(), str(path))
            except (
                UnidentifiedImageError,
                OSError,
                ValueError,
                Image.DecompressionBombError,
            ) as err:
                reason = "not an image file Pillow can read"
                if not isinstance(err, UnidentifiedImageError):
                    reason = f"unreadable image ({err})"
                raise InvalidImage(f"{path}: {reason}") from None
        if isinstance(image, np.ndarray):
            return _array_to_pil(image, name)
        raise InvalidImage(
            f"{name}: got {type(image).__name__}; expected a file path, a PIL image or a uint8 "
            f"array"
        )

    def preprocess(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """Images -> the model's input: uint8 pixels, N x H x W x C (mode and size as the
        prepare stage makes them; scaling and normalisation are in the graph)."""
        from PIL import ImageOps
        from PIL.Image import Resampling

        items = _as_list(images)
        channels, height, width = self.input_shape
        arrays = []
        for index, image in enumerate(items):
            name = _image_name(image, index)
            img = self._to_pil(image, name)
            try:
                img = img.convert("L" if channels == 1 else "RGB")
            except (ValueError, OSError) as err:
                raise InvalidImage(f"{name}: cannot convert mode {img.mode} ({err})") from None
            if img.size != (width, height):
                img = ImageOps.fit(img, (width, height), Resampling.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
            arrays.append(array[:, :, None] if channels == 1 else array)
        return np.stack(arrays) if arrays else np.zeros((0, height, width, channels), np.uint8)

    def predict_proba(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """Class probabilities (softmax of the logits), one row per image."""
        x = self.preprocess(images)
        if len(x) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        logits = onnx_tools.run_logits(self.session, x, self.batch_size).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)

    def predict(
        self, images: ImageInput | Sequence[ImageInput], top_k: int = 5
    ) -> list[list[tuple[str, float]]]:
        """Per image, the `top_k` most likely `(label, probability)` pairs, most likely first.

        `images`: one image or a list of them (file paths, PIL images, HxW / HxWxC uint8 arrays).
        """
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k: got {top_k!r}; expected an integer >= 1")
        probabilities = self.predict_proba(images)
        k = min(top_k, len(self.classes))
        results = []
        for row in probabilities:
            order = np.argsort(-row, kind="stable")[:k]
            results.append([(self.classes[i], float(row[i])) for i in order])
        return results


def _ort_reason(err: Exception) -> str:
    """ONNX Runtime's reason without its prefix and the path it repeats, on one line."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text.rsplit("failed:", 1)[-1].strip()[:200]


def _as_list(images) -> list:
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def _usable(img, name: str):
    """`img` read as the prepare stage reads it (16-bit grayscale scaled to 8 bits), or
    InvalidImage when it has no pixels (a 0 x N image cannot be resized)."""
    if img.width == 0 or img.height == 0:
        raise InvalidImage(
            f"{name}: image of {img.width}x{img.height} pixels; expected at least 1x1"
        )
    if img.mode.startswith("I;16"):
        from pipeline.data import to_8bit

        img = to_8bit(img)
    return img


def _array_to_pil(array: np.ndarray, name: str):
    from PIL import Image

    if array.dtype != np.uint8:
        raise InvalidImage(f"{name}: array of dtype {array.dtype}; expected uint8 (0..255)")
    if array.size == 0:
        raise InvalidImage(f"{name}: array of shape {tuple(array.shape)} has no pixels")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4)):
        return Image.fromarray(np.ascontiguousarray(array))  # L, RGB or RGBA
    raise InvalidImage(
        f"{name}: array of shape {tuple(array.shape)}; expected HxW or HxWxC with C in 1, 3, 4 "
        f"channels"
    )
