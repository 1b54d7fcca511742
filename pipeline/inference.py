"""Classify images with an exported ONNX model; preprocessing and labels come from the file.

    from pipeline.inference import OnnxClassifier
    clf = OnnxClassifier("exported_models/model_int8.onnx")      # device="auto" | "cpu" | "cuda"
    clf.predict(["seven.png", pil_image, uint8_array], top_k=3)  # -> [[("7", 0.98), ...], ...]

The export stage writes into every model's `metadata_props` what inference needs (see
`REQUIRED_METADATA`): the class names, the input shape (C, H, W) and layout (NCHW), and the
mean / std of the training images. An image (a file path, a PIL image, or an HxW / HxWxC uint8
array; `.npy` files hold such arrays) is converted to the model's mode (grayscale or RGB),
centre-cropped to the model's aspect ratio and resized (bilinear, as the prepare stage does),
scaled to [0, 1] and normalised. Bad input raises `InvalidModel` / `InvalidImage`
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

METADATA_FORMAT = "pipeline.onnx/1"
# Keys inference cannot do without (all JSON values except input_layout).
REQUIRED_METADATA = ("classes", "mean", "std", "input_shape", "input_layout")
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
    try:
        parsed = {k: json.loads(meta[k]) for k in ("classes", "mean", "std", "input_shape")}
    except json.JSONDecodeError as err:
        raise InvalidModel(f"{path}: unreadable metadata value ({err})") from None
    channels = parsed["input_shape"][0]
    if meta["input_layout"] != "NCHW" or len(parsed["input_shape"]) != 3 or channels not in (1, 3):
        raise InvalidModel(
            f"{path}: unsupported input {meta['input_layout']} {parsed['input_shape']}; "
            f"expected NCHW with 1 or 3 channels"
        )
    if len(parsed["mean"]) != channels or len(parsed["std"]) != channels:
        raise InvalidModel(f"{path}: mean / std do not match {channels} input channels")
    return parsed


class OnnxClassifier:
    """An exported classifier: ONNX Runtime session plus the preprocessing in its metadata.

    Args:
        path: an ONNX file written by the export stage.
        device: `auto` (CUDA when a GPU works, else CPU), `cpu` or `cuda` (falls back to the
            CPU with a warning when there is no GPU).
        batch_size: images per ONNX Runtime call.

    Attributes: `classes`, `input_shape` (C, H, W), `mean`, `std`, `provider` (the execution
    provider that really runs), `metadata` (every `metadata_props` entry, as strings).

    Raises:
        InvalidModel: missing file, not an ONNX model, or no pipeline metadata.
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
        """The graph's input and output sizes must match the metadata (fixed dims only)."""
        input_dims = self.session.get_inputs()[0].shape[1:]
        output_dims = self.session.get_outputs()[0].shape[1:]
        fixed = [(a, b) for a, b in zip(input_dims, self.input_shape, strict=False)]
        if len(input_dims) != 3 or any(isinstance(a, int) and a != b for a, b in fixed):
            raise InvalidModel(
                f"{self.path}: graph input {input_dims} does not match the metadata's "
                f"input_shape {list(self.input_shape)}"
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
            return image
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
                    return img.copy()
            except (UnidentifiedImageError, OSError, ValueError) as err:
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
        """Images -> the model's float32 NCHW input (mode, size, scaling, normalisation)."""
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
            array = np.asarray(img, dtype=np.float32) / 255.0
            arrays.append(array[None] if channels == 1 else array.transpose(2, 0, 1))
        x = np.stack(arrays) if arrays else np.zeros((0, *self.input_shape), np.float32)
        return ((x - self.mean) / self.std).astype(np.float32)

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


def _array_to_pil(array: np.ndarray, name: str):
    from PIL import Image

    if array.dtype != np.uint8:
        raise InvalidImage(f"{name}: array of dtype {array.dtype}; expected uint8 (0..255)")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4)):
        return Image.fromarray(np.ascontiguousarray(array))  # L, RGB or RGBA
    raise InvalidImage(
        f"{name}: array of shape {tuple(array.shape)}; expected HxW or HxWxC with C in 1, 3, 4 "
        f"channels"
    )
