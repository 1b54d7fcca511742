"""Training throughput: our engine against the PyTorch tutorial's loop, side by side.

The tutorial's loop (pytorch.org "Training a Classifier"): a Dataset that turns each uint8
image into a PIL image and applies torchvision `ToTensor` + `Normalize` per sample, a
`DataLoader(shuffle=True, num_workers=2)`, and the plain zero_grad / forward / backward / step
loop. Ours: `pipeline.engine.fit` with the split held as one normalised tensor, batches sliced
from a seeded permutation, NHWC layout while training (`train.channels_last`, the default); the
`engine NCHW` column is the same engine with `channels_last: false`, to show what the layout
adds on top of the data path. Same model, batch size, optimizer (SGD, momentum 0.9), learning rate,
epochs; no augmentation in either; only training time counts (our per-epoch validation is
excluded). Datasets: digits (8x8) and a CIFAR-shaped synthetic set of 10,000 3x32x32 images.
The last line is the ratio on the CIFAR-shaped set with the tutorial's own net (`lenet`).

    python benchmarks/train_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine, print_table, synthetic_prepared  # noqa: E402

from pipeline.config import DataConfig, TrainConfig  # noqa: E402
from pipeline.data import DeviceData, prepare  # noqa: E402
from pipeline.engine import fit  # noqa: E402
from pipeline.models import create_model  # noqa: E402


class TutorialDataset(Dataset):
    """Per-sample PIL conversion + ToTensor + Normalize, as torchvision's CIFAR10 does."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std):
        import torchvision.transforms as T

        self.images = images.permute(0, 2, 3, 1).numpy()  # N, H, W, C uint8
        self.labels = labels.tolist()
        self.transform = T.Compose([T.ToTensor(), T.Normalize(mean, std)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        array = self.images[i]
        img = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
        return self.transform(img), self.labels[i]


def tutorial_loop(model, prepared, cfg: TrainConfig, workers: int) -> float:
    """Images per second of the tutorial's loop (training time only)."""
    images, labels = prepared.splits["train"]
    info = prepared.info
    loader = DataLoader(
        TutorialDataset(images, labels, info["mean"], info["std"]),
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
    )
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    seen, start = 0, time.perf_counter()
    for _ in range(cfg.epochs):
        for inputs, targets in loader:
            optimizer.zero_grad()
            loss = criterion(model(inputs), targets)
            loss.backward()
            optimizer.step()
            seen += len(targets)
    return seen / (time.perf_counter() - start)


def engine_loop(model, prepared, cfg: TrainConfig) -> float:
    data = DeviceData(prepared, torch.device("cpu"))
    return fit(model, data, cfg, progress=False).images_per_second


def compare(dataset: str, prepared, model_name: str, cfg: TrainConfig, workers: int) -> dict:
    info = prepared.info
    shape = info["shape"]

    def fresh():
        torch.manual_seed(0)
        return create_model(model_name, len(info["classes"]), shape[0], shape[1])

    ours = engine_loop(fresh(), prepared, cfg)
    nchw = engine_loop(fresh(), prepared, dataclasses.replace(cfg, channels_last=False))
    theirs = tutorial_loop(fresh(), prepared, cfg, workers)
    return {
        "dataset": dataset,
        "model": model_name,
        "batch": cfg.batch_size,
        "epochs": cfg.epochs,
        "tutorial img/s": theirs,
        "engine NCHW img/s": nchw,
        "engine img/s": ours,
        "speedup": ours / theirs,
    }


def warm_up() -> None:
    """Pay the one-time lazy imports of the first optimizer step (torch._dynamo, about 2 s)
    before anything is timed, so neither side is charged for them."""
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    weight.sum().backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, default=2, help="tutorial DataLoader workers")
    args = parser.parse_args()
    # SGD with momentum, constant lr, as in the tutorial
    cfg = TrainConfig(
        epochs=1 if args.quick else 3,
        batch_size=64,
        lr=0.01,
        momentum=0.9,
        weight_decay=0.0,
        scheduler="none",
        augment="none",
    )
    warm_up()
    digits = prepare(DataConfig(), seed=0)
    cifar = synthetic_prepared(3_000 if args.quick else 10_000)
    cifar_name = f"cifar-shaped {cifar.info['counts']['train']}x3x32x32"
    rows = [
        compare("digits 1x8x8", digits, "cnn", cfg, args.workers),
        compare("digits 1x8x8", digits, "lenet", cfg, args.workers),
        compare(cifar_name, cifar, "cnn", cfg, args.workers),
        compare(cifar_name, cifar, "lenet", cfg, args.workers),
    ]
    print(f"machine: {machine()}")
    print_table(
        rows,
        [
            "dataset",
            "model",
            "batch",
            "epochs",
            "tutorial img/s",
            "engine NCHW img/s",
            "engine img/s",
            "speedup",
        ],
    )
    print(f"speedup: {rows[-1]['speedup']:.2f}x")


if __name__ == "__main__":
    main()
