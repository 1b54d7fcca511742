"""Datasets: read a source once, split it, store uint8 tensors; load them onto a device.

Sources (`data.name`):
- `digits`: scikit-learn's bundled `load_digits` (1797 real 8x8 handwritten digits, offline).
- `cifar10`, `mnist`, `fashion_mnist`: torchvision, downloaded to `data.raw_dir` when online;
  their official test split is the test split, val is carved from the official train split.
- `imagefolder`: `data.root/<class>/<image>`; decoded once with Pillow, centre-cropped and
  resized to `data.image_size`; grayscale when every image is, else RGB (16-bit grayscale
  scaled to 8 bits by `to_8bit`, which inference uses too).

Splits are seeded and stratified. `save_prepared` writes `<dir>/{train,val,test}.pt` (dicts of
`images` uint8 NxCxHxW and `labels` int64) and `dataset.json` (classes, shape, mean/std of the
train split, counts, sha256 of each split's tensors). `DeviceData` holds the splits normalised
once on the training device.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import paths
from pipeline.config import DataConfig
from pipeline.errors import DataError
from pipeline.files import atomic_path, load_tensors, read_json, write_json

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Per-batch augmentation a dataset allows (digits are tiny and not flip-invariant).
DEFAULT_AUGMENT = {
    "digits": "none",
    "mnist": "crop",
    "fashion_mnist": "crop",
    "cifar10": "crop_flip",
    "imagefolder": "crop_flip",
}


@dataclass
class RawDataset:
    images: np.ndarray  # uint8, N x C x H x W
    labels: np.ndarray  # int64, N
    classes: list[str]
    test_images: np.ndarray | None = None  # an official test split, when the source has one
    test_labels: np.ndarray | None = None


@dataclass
class Prepared:
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]  # split -> (uint8 images, labels)
    info: dict  # the content of dataset.json


def load_digits_dataset() -> RawDataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16; scale to the full uint8 range.
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return RawDataset(images, digits.target.astype(np.int64), [str(c) for c in range(10)])


_TORCHVISION = {"cifar10": "CIFAR10", "mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
_MANUAL_FILES = {
    "cifar10": "cifar-10-python.tar.gz, or its extracted folder cifar-10-batches-py/",
    "mnist": "MNIST/raw/ with the four *-ubyte files (or their .gz archives)",
    "fashion_mnist": "FashionMNIST/raw/ with the four *-ubyte files (or their .gz archives)",
}


def _cifar_checksum_error(folder: Path) -> DataError | None:
    """The first CIFAR-10 batch file in `folder` that is missing or fails its official md5.

    torchvision unpickles these files; a file that fails its checksum is never loaded (a pickle
    can run any code), so a hand-placed copy must be the official one.
    """
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import calculate_md5

    expected = CIFAR10.train_list + CIFAR10.test_list
    expected = expected + [[CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]
    for name, md5 in expected:
        path = folder / name
        if not path.is_file():
            return DataError(f"{path}: missing; place the official CIFAR-10 python batches there")
        got = calculate_md5(str(path))
        if got != md5:
            return DataError(
                f"{path}: md5 {got} differs from the official CIFAR-10 checksum {md5}; not "
                f"loaded (pickle files run code). Replace it with the official file, or delete "
                f"{folder} to download again"
            )
    return None


def _torchvision_split(cls, root: Path, train: bool, download: bool):
    ds = cls(root=str(root), train=train, download=download)
    images = np.asarray(ds.data)
    if images.ndim == 3:  # MNIST-style N x H x W
        images = images[:, None]
    else:  # CIFAR-style N x H x W x C
        images = images.transpose(0, 3, 1, 2)
    labels = np.asarray(ds.targets, dtype=np.int64)
    return np.ascontiguousarray(images, dtype=np.uint8), labels, list(ds.classes)


def load_torchvision_dataset(name: str, raw_dir: Path, download: bool) -> RawDataset:
    import torchvision.datasets as tvd

    cls = getattr(tvd, _TORCHVISION[name])
    cifar_folder = raw_dir / "cifar-10-batches-py"
    try:
        train = _torchvision_split(cls, raw_dir, True, download=False)
        test = _torchvision_split(cls, raw_dir, False, download=False)
    except RuntimeError:
        bad_file = _cifar_checksum_error(cifar_folder) if cifar_folder.is_dir() else None
        if name == "cifar10" and bad_file is not None:
            raise bad_file from None
        if not download:
            raise DataError(
                f"data.name={name}: not found in {raw_dir} and data.download is false; place "
                f"{_MANUAL_FILES[name]} in {raw_dir}/"
            ) from None
        else:
            try:
                train = _torchvision_split(cls, raw_dir, True, download=True)
                test = _torchvision_split(cls, raw_dir, False, download=True)
            except Exception as err:  # network errors come as URLError, OSError, RuntimeError
                raise DataError(
                    f"data.name={name}: download to {raw_dir} failed ({type(err).__name__}: "
                    f"{str(err)[:120]}); offline, place {_MANUAL_FILES[name]} in {raw_dir}/"
                ) from None
    return RawDataset(train[0], train[1], train[2], test[0], test[1])


def to_8bit(img):
    """A 16-bit grayscale image (Pillow modes I;16, I;16B, ...) scaled to 8 bits (mode L);
    other images as they are. Pillow's own conversion clips at 255, which turns a 16-bit image
    into a nearly binary one. The prepare stage and inference both read images through this."""
    if not img.mode.startswith("I;16"):
        return img
    from PIL import Image

    wide = np.asarray(img).astype(np.uint32)
    return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))


def _decode_image(path: Path, size: int):
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            img = to_8bit(img)
            gray = img.mode in ("1", "L", "LA", "I", "F")
            img = img.convert("L" if gray else "RGB")
            img = ImageOps.fit(img, (size, size), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8), gray
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"data.root: cannot read image {path}: {err}") from None


def load_image_folder(root: Path, image_size: int) -> RawDataset:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root: got {str(root)!r}; expected an existing folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [
        (f, label)
        for label, d in enumerate(class_dirs)
        for f in sorted(d.rglob("*"))
        if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
    ]
    if len(class_dirs) < 2 or not files:
        raise DataError(
            f"data.root: {root} needs at least 2 class sub-folders with images "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}); found {len(class_dirs)} folders, "
            f"{len(files)} images"
        )
    empty = [d.name for label, d in enumerate(class_dirs) if all(y != label for _, y in files)]
    if empty:  # a class the model could never learn: an output it would never predict
        raise DataError(
            f"data.root: class folder {str(root / empty[0])!r} has no images "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add some or remove the folder"
        )
    decoded = [_decode_image(f, image_size) for f, _ in files]
    all_gray = all(gray for _, gray in decoded)
    arrays = []
    for arr, gray in decoded:
        if all_gray:
            arrays.append(arr[None])
        else:
            arrays.append(np.repeat(arr[None], 3, 0) if gray else arr.transpose(2, 0, 1))
    labels = np.asarray([label for _, label in files], dtype=np.int64)
    return RawDataset(np.stack(arrays), labels, [d.name for d in class_dirs])


def load_raw(cfg: DataConfig) -> RawDataset:
    if cfg.name == "digits":
        return load_digits_dataset()
    if cfg.name == "imagefolder":
        return load_image_folder(Path(cfg.root), cfg.image_size)
    return load_torchvision_dataset(cfg.name, Path(cfg.raw_dir), cfg.download)


def stratified_split(labels: np.ndarray, fractions: dict[str, float], seed: int):
    """Indices per split; `fractions` maps split names (except 'train') to fractions."""
    from sklearn.model_selection import train_test_split  # 1.4 s of import: only where used

    idx = np.arange(len(labels))
    out, rest = {}, idx
    remaining = 1.0
    for split, frac in fractions.items():
        share = frac / remaining
        try:
            rest, taken = train_test_split(
                rest, test_size=share, random_state=seed, stratify=labels[rest]
            )
        except ValueError as err:
            raise DataError(
                f"data.{split}_fraction: {frac:g} leaves a split without some class ({err}); "
                f"use more images per class or a larger fraction"
            ) from None
        out[split] = np.sort(taken)
        remaining -= frac
    out["train"] = np.sort(rest)
    return out


def _tensor_sha256(images: torch.Tensor, labels: torch.Tensor) -> str:
    digest = hashlib.sha256(images.contiguous().numpy().tobytes())
    digest.update(labels.contiguous().numpy().tobytes())
    return digest.hexdigest()


def prepare(cfg: DataConfig, seed: int) -> Prepared:
    """Load `cfg`'s source and split it (seeded, stratified). No file output."""
    raw = load_raw(cfg)
    if raw.test_images is not None:
        parts = stratified_split(raw.labels, {"val": cfg.val_fraction}, seed)
        pools = {"train": (raw.images, raw.labels), "val": (raw.images, raw.labels)}
        splits = {s: (pools[s][0][parts[s]], pools[s][1][parts[s]]) for s in ("train", "val")}
        splits["test"] = (raw.test_images, raw.test_labels)
    else:
        fractions = {"val": cfg.val_fraction, "test": cfg.test_fraction}
        parts = stratified_split(raw.labels, fractions, seed)
        splits = {s: (raw.images[parts[s]], raw.labels[parts[s]]) for s in SPLITS}
    tensors = {
        s: (torch.from_numpy(x.copy()), torch.from_numpy(y.copy())) for s, (x, y) in splits.items()
    }
    train_x = tensors["train"][0].double() / 255.0
    mean = train_x.mean(dim=(0, 2, 3))
    std = train_x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    info = {
        "name": cfg.name,
        "classes": raw.classes,
        "shape": list(raw.images.shape[1:]),  # C, H, W
        "mean": [round(float(m), 6) for m in mean],
        "std": [round(float(s), 6) for s in std],
        "counts": {s: int(tensors[s][1].numel()) for s in SPLITS},
        "augment": DEFAULT_AUGMENT[cfg.name],
        "seed": seed,
        "sha256": {s: _tensor_sha256(*tensors[s]) for s in SPLITS},
    }
    info["sha256"]["all"] = hashlib.sha256(
        "".join(info["sha256"][s] for s in SPLITS).encode()
    ).hexdigest()
    return Prepared(tensors, info)


def save_prepared(prepared: Prepared, out_dir: Path = paths.PREPARED_DIR) -> None:
    out_dir = Path(out_dir)
    for split, (images, labels) in prepared.splits.items():
        with atomic_path(paths.split_file(split, out_dir)) as tmp:
            torch.save({"images": images, "labels": labels}, tmp)
    write_json(out_dir / "dataset.json", prepared.info)


def load_prepared(prepared_dir: Path = paths.PREPARED_DIR) -> Prepared:
    prepared_dir = Path(prepared_dir)
    info_path = prepared_dir / "dataset.json"
    if not info_path.is_file():
        raise DataError(f"{info_path}: not found; run the prepare stage first (dvc repro)")
    rerun = "run the prepare stage again (dvc repro -f prepare)"
    splits = {}
    for split in SPLITS:
        path = paths.split_file(split, prepared_dir)
        if not path.is_file():
            raise DataError(f"{path}: not found; {rerun}")
        blob = load_tensors(path, "prepared split", rerun)
        images, labels = (
            blob.get(k) if isinstance(blob, dict) else None for k in ("images", "labels")
        )
        if not (
            isinstance(images, torch.Tensor)
            and images.dtype == torch.uint8
            and images.ndim == 4
            and isinstance(labels, torch.Tensor)
            and len(labels) == len(images)
        ):
            raise DataError(
                f"{path}: not a prepared split (uint8 N x C x H x W images + labels); {rerun}"
            )
        splits[split] = (images, labels)
    try:
        info = read_json(info_path)
    except (ValueError, OSError) as err:
        raise DataError(
            f"{info_path}: unreadable ({' '.join(str(err).split())[:120]}); {rerun}"
        ) from None
    missing = [k for k in DATASET_KEYS if not isinstance(info, dict) or k not in info]
    if missing:
        raise DataError(f"{info_path}: not a dataset description (no {missing[0]!r}); {rerun}")
    return Prepared(splits, info)


# dataset.json keys the stages read
DATASET_KEYS = ("name", "classes", "shape", "mean", "std", "counts", "sha256")


class DeviceData:
    """The prepared splits normalised once, as float tensors on one device (`x`, `y`); `images`
    keeps the prepared uint8 N x C x H x W tensors as they were (what ONNX models are fed)."""

    def __init__(self, prepared: Prepared, device: torch.device, channels_last: bool = False):
        self.info = prepared.info
        self.device = torch.device(device)
        mean = torch.tensor(self.info["mean"], device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(self.info["std"], device=self.device).view(1, -1, 1, 1)
        self.x, self.y = {}, {}
        self.images = {split: images for split, (images, _) in prepared.splits.items()}
        for split, (images, labels) in prepared.splits.items():
            x = (images.to(self.device).float() / 255.0 - mean) / std
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            self.x[split], self.y[split] = x, labels.to(self.device)

    @property
    def num_classes(self) -> int:
        return len(self.info["classes"])

    @property
    def in_channels(self) -> int:
        return self.info["shape"][0]

    @property
    def image_size(self) -> int:
        return self.info["shape"][1]
