import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data import DeviceData, load_prepared, prepare, save_prepared
from pipeline.errors import DataError


def _check_split(prepared, n_classes):
    counts = prepared.info["counts"]
    for split, (x, y) in prepared.splits.items():
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        assert len(x) == len(y) == counts[split]
        assert list(x.shape[1:]) == prepared.info["shape"]
        assert set(y.tolist()) == set(range(n_classes)), f"{split} misses a class"


def test_digits_split_is_stratified_seeded_and_disjoint(tmp_path):
    cfg = DataConfig(val_fraction=0.15, test_fraction=0.2)
    a, b, c = prepare(cfg, seed=0), prepare(cfg, seed=0), prepare(cfg, seed=1)
    _check_split(a, 10)
    assert sum(a.info["counts"].values()) == 1797
    assert a.info["shape"] == [1, 8, 8]
    assert a.info["counts"]["test"] == pytest.approx(0.2 * 1797, abs=2)
    assert a.info["sha256"] == b.info["sha256"]
    assert a.info["sha256"]["test"] != c.info["sha256"]["test"]
    # stratified: class shares in test within 2 points of those in train
    train_share = np.bincount(a.splits["train"][1].numpy()) / a.info["counts"]["train"]
    test_share = np.bincount(a.splits["test"][1].numpy()) / a.info["counts"]["test"]
    assert np.abs(train_share - test_share).max() < 0.02
    # no image appears in two splits (rows compared as bytes; digits has few exact duplicates)
    rows = {s: {bytes(x.numpy()) for x in a.splits[s][0]} for s in a.splits}
    assert len(rows["train"] & rows["test"]) <= 3
    # mean/std come from the train split only
    train = a.splits["train"][0].double() / 255
    assert a.info["mean"][0] == pytest.approx(train.mean().item(), abs=1e-5)
    assert a.info["std"][0] == pytest.approx(train.std().item(), abs=1e-5)


def test_save_load_round_trip_and_device_normalisation(tmp_path):
    prepared = prepare(DataConfig(), seed=0)
    save_prepared(prepared, tmp_path)
    loaded = load_prepared(tmp_path)
    assert loaded.info == prepared.info
    for split in prepared.splits:
        assert torch.equal(loaded.splits[split][0], prepared.splits[split][0])
    data = DeviceData(loaded, torch.device("cpu"))
    assert data.x["train"].mean().item() == pytest.approx(0.0, abs=1e-4)
    assert data.x["train"].std().item() == pytest.approx(1.0, abs=1e-3)
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 1, 8)


def test_load_prepared_without_prepare_says_what_to_run(tmp_path):
    with pytest.raises(DataError, match="run the prepare stage"):
        load_prepared(tmp_path / "nothing")


def _write_idx(path, array):
    dims = array.shape
    header = struct.pack(">HBB", 0, 0x08, len(dims)) + b"".join(struct.pack(">I", d) for d in dims)
    with gzip.open(path, "wb") if path.suffix == ".gz" else open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize(
    ("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")]
)
def test_torchvision_mnist_format_fixture(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 200), ("t10k", 50)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 255, (n, 28, 28))
        images[:, 0, 0] = labels * 20  # mark each image with its label
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    prepared = prepare(DataConfig(name=name, raw_dir=str(tmp_path), download=False), seed=0)
    _check_split(prepared, 10)
    assert prepared.info["shape"] == [1, 28, 28]
    assert prepared.info["counts"] == {"train": 170, "val": 30, "test": 50}
    x, y = prepared.splits["val"]
    assert torch.equal(x[:, 0, 0, 0].long(), y * 20)


def _cifar_batch(rng, n, offset):
    labels = [(i + offset) % 10 for i in range(n)]
    data = rng.integers(0, 255, (n, 3 * 32 * 32), dtype=np.uint8)
    data[:, 0] = np.asarray(labels) * 10
    return {"data": data, "labels": labels}


def _write_cifar_folder(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as fh:
            pickle.dump(_cifar_batch(rng, 40, i), fh)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump(_cifar_batch(rng, 30, 0), fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)


def test_cifar10_batches_are_read_channel_first_by_torchvision(tmp_path):
    """torchvision's own CIFAR-10 reader, its md5 list pointed at this fixture's files."""
    import torchvision.datasets as tvd
    from torchvision.datasets.utils import calculate_md5

    from pipeline.data import _torchvision_split

    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar_folder(folder)

    def md5s(entries):
        return [[name, calculate_md5(str(folder / name))] for name, _ in entries]

    class FixtureCifar(tvd.CIFAR10):
        train_list = md5s(tvd.CIFAR10.train_list)
        test_list = md5s(tvd.CIFAR10.test_list)
        meta = {**tvd.CIFAR10.meta, "md5": calculate_md5(str(folder / "batches.meta"))}

    images, labels, classes = _torchvision_split(FixtureCifar, tmp_path, True, download=False)
    assert images.shape == (200, 3, 32, 32) and images.dtype == np.uint8
    assert classes == [f"c{i}" for i in range(10)]  # read from batches.meta
    assert np.array_equal(images[:, 0, 0, 0].astype(np.int64), labels * 10)  # NCHW kept it


class _Tripwire:
    """Unpickling this writes a file: proof that a bad file was loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_cifar10_file_failing_its_checksum_is_refused_and_never_unpickled(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar_folder(folder)
    marker = tmp_path / "unpickled"
    for name in ["batches.meta", "test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]:
        with open(folder / name, "wb") as fh:
            pickle.dump(_Tripwire(marker), fh)
    for download in (False, True):  # never download over (or load) the bad files either
        with pytest.raises(DataError) as info:
            prepare(DataConfig(name="cifar10", raw_dir=str(tmp_path), download=download), 0)
        message = str(info.value)
        assert str(folder / "data_batch_1") in message and "md5" in message
        assert "c99cafc152244af753f735de768cd75f" in message  # the official checksum
        assert "\n" not in message
    assert not marker.exists()


def test_cifar10_missing_batch_file_is_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar_folder(folder)
    (folder / "data_batch_1").unlink()
    with pytest.raises(DataError, match="data_batch_1: missing"):
        prepare(DataConfig(name="cifar10", raw_dir=str(tmp_path), download=False), 0)


def test_torchvision_offline_error_says_where_to_put_files(tmp_path):
    with pytest.raises(DataError) as info:
        prepare(DataConfig(name="cifar10", raw_dir=str(tmp_path), download=False), seed=0)
    assert "cifar-10-python.tar.gz" in str(info.value)
    assert str(tmp_path) in str(info.value)


def _write_images(root, mode, sizes=((20, 12), (9, 9))):
    rng = np.random.default_rng(0)
    for label in ("cat", "dog", "eel"):
        (root / label).mkdir(parents=True)
        for i in range(10):
            w, h = sizes[i % 2]
            shape = (h, w) if mode == "L" else (h, w, 3)
            pixels = rng.integers(0, 255, shape, dtype=np.uint8)
            Image.fromarray(pixels, mode).save(root / label / f"{i}.png")


@pytest.mark.parametrize(("mode", "channels"), [("RGB", 3), ("L", 1)])
def test_imagefolder_decodes_resizes_and_picks_channels(tmp_path, mode, channels):
    _write_images(tmp_path / "imgs", mode)
    cfg = DataConfig(
        name="imagefolder",
        root=str(tmp_path / "imgs"),
        image_size=16,
        val_fraction=0.2,
        test_fraction=0.2,
    )
    prepared = prepare(cfg, seed=0)
    assert prepared.info["classes"] == ["cat", "dog", "eel"]
    assert prepared.info["shape"] == [channels, 16, 16]
    assert sum(prepared.info["counts"].values()) == 30
    _check_split(prepared, 3)


def test_imagefolder_mixed_gray_and_rgb_becomes_rgb(tmp_path):
    _write_images(tmp_path / "imgs", "L")
    Image.new("RGB", (10, 10), (255, 0, 0)).save(tmp_path / "imgs" / "cat" / "red.png")
    cfg = DataConfig(
        name="imagefolder",
        root=str(tmp_path / "imgs"),
        image_size=8,
        val_fraction=0.2,
        test_fraction=0.2,
    )
    prepared = prepare(cfg, seed=0)
    assert prepared.info["shape"] == [3, 8, 8]
    images = torch.cat([x for x, _ in prepared.splits.values()])
    red = (images[:, 0] == 255) & (images[:, 1] == 0) & (images[:, 2] == 0)
    assert red.flatten(1).all(1).sum() == 1


def test_imagefolder_unreadable_image_names_the_file(tmp_path):
    _write_images(tmp_path / "imgs", "RGB")
    bad = tmp_path / "imgs" / "dog" / "broken.png"
    bad.write_bytes(b"not an image")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path / "imgs"))
    with pytest.raises(DataError, match="broken.png"):
        prepare(cfg, seed=0)


def test_imagefolder_missing_folder(tmp_path):
    with pytest.raises(DataError, match="data.root"):
        prepare(DataConfig(name="imagefolder", root=str(tmp_path / "none")), seed=0)
