"""Training throughput: our engine against the PyTorch tutorial's loop and a competent
DataLoader loop, side by side, with the achieved GFLOP/s.

Compared, per dataset and model (same model, batch 64, optimizer SGD with Nesterov momentum 0.9,
constant learning rate, no augmentation, training time only):
- `tutorial`: the PyTorch tutorial's loop (pytorch.org "Training a Classifier"): a Dataset that
  turns each uint8 image into a PIL image and applies torchvision `ToTensor` + `Normalize` per
  sample, `DataLoader(shuffle=True, num_workers=2)`, the plain zero_grad / forward / backward /
  step loop;
- `DataLoader`: what a competent user writes (and Optuna's examples do): a `DataLoader` with
  shuffle over a `TensorDataset` of the already-normalised in-memory tensors, the same plain
  loop, PyTorch's defaults (NCHW, fp32, the optimizer's default implementation);
- `engine NCHW`: `pipeline.engine.fit` with `train.channels_last: false` (the data path alone);
- `engine`: `pipeline.engine.fit` as configured by default (NHWC, foreach optimizer step);
- `engine bf16`: the engine with `train.amp_cpu: true` (bf16 autocast of the training step;
  only on CPUs with native bf16, AVX512-BF16 or AMX; otherwise the column is empty).

GFLOP/s: the FLOPs of one training step (forward + backward, convolutions and matrix products,
counted by `torch.utils.flop_counter.FlopCounterMode`; batch norm, pooling and element-wise ops
not counted) times steps per second. Variants run interleaved (each round runs every variant
once), `--rounds` rounds; images/s are medians (min-max below them), ratios the median of the
per-round ratios. `best` is the faster of `engine` and `engine bf16` in each round. Datasets:
digits (8x8) and a CIFAR-shaped synthetic set (3x32x32). The last line is the engine's ratio
to the tutorial on the CIFAR-shaped set with the tutorial's own net (`lenet`).

    taskset -c 1 env OMP_NUM_THREADS=1 python benchmarks/train_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine, print_table, synthetic_prepared  # noqa: E402

from pipeline.config import DataConfig, TrainConfig  # noqa: E402
from pipeline.data import DeviceData, prepare  # noqa: E402
from pipeline.engine import cpu_has_bf16, fit  # noqa: E402
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


def plain_loop(model, loader, cfg: TrainConfig) -> float:
    """Images per second of the plain zero_grad / forward / backward / step loop."""
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True
    )
    model.train()
    seen, start = 0, time.perf_counter()
    for _ in range(cfg.epochs):
        for inputs, targets in loader:
            optimizer.zero_grad()
            loss = criterion(model(inputs), targets)
            loss.backward()
            optimizer.step()
            seen += len(targets)
    return seen / (time.perf_counter() - start)


def tutorial_loop(model, prepared, data: DeviceData, cfg: TrainConfig, workers: int) -> float:
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
    return plain_loop(model, loader, cfg)


def dataloader_loop(model, prepared, data: DeviceData, cfg: TrainConfig, workers: int) -> float:
    """The competent baseline: the normalised split in memory, a shuffling DataLoader."""
    dataset = TensorDataset(data.x["train"], data.y["train"])
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True)
    return plain_loop(model, loader, cfg)


def engine(**changes):
    def run(model, prepared, data: DeviceData, cfg: TrainConfig, workers: int) -> float:
        return fit(
            model, data, dataclasses.replace(cfg, **changes), progress=False
        ).images_per_second

    return run


VARIANTS = {
    "tutorial": tutorial_loop,
    "DataLoader": dataloader_loop,
    "engine NCHW": engine(channels_last=False),
    "engine": engine(),
    "engine bf16": engine(amp_cpu=True),
}


def flops_per_image(model, data: DeviceData, batch: int) -> float:
    """Forward + backward FLOPs of one training step, per image (FlopCounterMode)."""
    x, y = data.x["train"][:batch], data.y["train"][:batch]
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(y)


def compare(dataset: str, prepared, model_name: str, cfg: TrainConfig, args) -> dict:
    info = prepared.info
    shape = info["shape"]
    data = DeviceData(prepared, torch.device("cpu"))
    variants = {k: v for k, v in VARIANTS.items() if k != "engine bf16" or cpu_has_bf16()}

    def fresh():
        torch.manual_seed(0)
        return create_model(model_name, len(info["classes"]), shape[0], shape[1])

    flops = flops_per_image(fresh(), data, cfg.batch_size)
    rates = {k: [] for k in variants}
    for _ in range(args.rounds):  # interleaved: a slow spell hits every variant alike
        for name, run in variants.items():
            rates[name].append(run(fresh(), prepared, data, cfg, args.workers))
    row = {"dataset": dataset, "model": model_name, "MFLOP/img": flops / 1e6}
    for name, values in rates.items():
        row[f"{name} img/s"] = statistics.median(values)
        row[f"{name} spread"] = f"{min(values):,.0f}-{max(values):,.0f}"
    for name in ("DataLoader", "engine", "engine bf16"):
        if name in rates:
            row[f"{name} GFLOP/s"] = row[f"{name} img/s"] * flops / 1e9
    # ratios per round (the variants of one round ran back to back), then their median
    bf16 = rates.get("engine bf16", rates["engine"])
    best = [max(e, b) for e, b in zip(rates["engine"], bf16, strict=True)]
    for name, ours, theirs in [
        ("engine / DataLoader", rates["engine"], rates["DataLoader"]),
        ("best / DataLoader", best, rates["DataLoader"]),
        ("engine / tutorial", rates["engine"], rates["tutorial"]),
    ]:
        row[name] = statistics.median(a / b for a, b in zip(ours, theirs, strict=True))
    print(
        f"{dataset} {model_name}: "
        + ", ".join(f"{k} {' '.join(f'{v:,.0f}' for v in vs)}" for k, vs in rates.items()),
        flush=True,
    )
    return row


def warm_up() -> None:
    """Pay the one-time lazy imports of the first optimizer step (torch._dynamo, about 2 s)
    before anything is timed, so no variant is charged for them."""
    weight = torch.nn.Parameter(torch.zeros(2))
    for kwargs in ({}, {"foreach": True}):
        optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9, **kwargs)
        weight.sum().backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round, smaller CIFAR-shaped set")
    parser.add_argument("--workers", type=int, default=2, help="tutorial DataLoader workers")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 1
    torch.set_num_threads(torch.get_num_threads())  # OMP_NUM_THREADS, as the caller pinned it
    digits_cfg = TrainConfig(
        epochs=3, batch_size=64, lr=0.01, momentum=0.9, weight_decay=0.0, scheduler="none",
        augment="none",
    )  # fmt: skip
    cifar_cfg = dataclasses.replace(digits_cfg, epochs=1)
    warm_up()
    digits = prepare(DataConfig(), seed=0)
    cifar = synthetic_prepared(2_000 if args.quick else 5_000)
    cifar_name = f"cifar-shaped {cifar.info['counts']['train']}x3x32x32"
    rows = [
        compare("digits 1x8x8", digits, "cnn", digits_cfg, args),
        compare("digits 1x8x8", digits, "lenet", digits_cfg, args),
        compare(cifar_name, cifar, "cnn", cifar_cfg, args),
        compare(cifar_name, cifar, "lenet", cifar_cfg, args),
    ]
    print(f"machine: {machine()}")
    print(
        f"batch 64, SGD (Nesterov momentum 0.9), lr 0.01, no augmentation; digits "
        f"{digits_cfg.epochs} epochs, CIFAR-shaped {cifar_cfg.epochs} epoch per measurement; "
        f"{args.rounds} interleaved round(s), medians; tutorial workers {args.workers}"
    )
    names = [k for k in VARIANTS if f"{k} img/s" in rows[0]]
    print_table(rows, ["dataset", "model", "MFLOP/img", *[f"{k} img/s" for k in names]])
    print_table(
        rows,
        [
            "dataset",
            "model",
            *[f"{k} GFLOP/s" for k in ("DataLoader", "engine", "engine bf16") if k in names],
            "engine / DataLoader",
            "best / DataLoader",
            "engine / tutorial",
        ],
    )
    print("spread (min-max over rounds, img/s):")
    print_table(rows, ["dataset", "model", *[f"{k} spread" for k in names]])
    print(f"speedup: {rows[-1]['engine / tutorial']:.2f}x")


if __name__ == "__main__":
    main()
