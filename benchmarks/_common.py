"""Shared benchmark helpers: synthetic CIFAR-shaped data, timing, table printing."""

from __future__ import annotations

import platform
import statistics
import time

import numpy as np
import torch

from pipeline.data import Prepared


def synthetic_prepared(
    n_train: int, channels: int = 3, size: int = 32, classes: int = 10, seed: int = 0
) -> Prepared:
    """Random uint8 images with a learnable signal (class-dependent mean), CIFAR-shaped."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (
        ("train", n_train),
        ("val", max(classes, n_train // 10)),
        ("test", max(classes, n_train // 10)),
    ):
        labels = rng.integers(0, classes, n)
        images = rng.integers(0, 160, (n, channels, size, size)).astype(np.int64)
        images += (labels * (90 // classes))[:, None, None, None]
        splits[split] = (torch.from_numpy(images.astype(np.uint8)), torch.from_numpy(labels))
    x = splits["train"][0].double() / 255
    info = {
        "name": "synthetic",
        "classes": [str(i) for i in range(classes)],
        "shape": [channels, size, size],
        "mean": x.mean(dim=(0, 2, 3)).tolist(),
        "std": x.std(dim=(0, 2, 3)).tolist(),
        "counts": {s: len(y) for s, (_, y) in splits.items()},
        "augment": "crop_flip",
        "sha256": {"all": "synthetic"},
    }
    return Prepared(splits, info)


def cifar_shaped_digits(train_images: int | None = None, scale: int = 4) -> Prepared:
    """The offline digits task, CIFAR-shaped: each 8x8 grey image upscaled `scale` times
    (bilinear, 32x32 by default) and repeated to 3 channels; the same splits as the pipeline's
    `digits` (seed 0: 270 val, 360 test images). With `train_images`, a stratified subset of
    the training split (150: the harder offline task of `search_efficiency.py`)."""
    from pipeline.config import parse_params
    from pipeline.data import prepare

    digits = prepare(parse_params({}).data, seed=0)
    splits = {}
    for split, (images, labels) in digits.splits.items():
        if split == "train" and train_images:
            per_class = train_images // len(digits.info["classes"])
            keep = torch.cat(
                [torch.nonzero(labels == c)[:per_class, 0] for c in labels.unique().tolist()]
            )
            images, labels = images[keep], labels[keep]
        big = torch.nn.functional.interpolate(
            images.float(), scale_factor=scale, mode="bilinear", align_corners=False
        )
        splits[split] = (big.round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1), labels)
    x = splits["train"][0].double() / 255
    size = 8 * scale
    info = digits.info | {
        "name": f"digits-{size}x{size}-rgb",
        "shape": [3, size, size],
        "mean": x.mean(dim=(0, 2, 3)).tolist(),
        "std": x.std(dim=(0, 2, 3)).tolist(),
        "counts": {s: len(y) for s, (_, y) in splits.items()},
    }
    return Prepared(splits, info)


def timed(fn, repeats: int, warmup: int = 2, sync=None) -> list[float]:
    """Seconds per call of `fn` over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return times


def p50(times: list[float]) -> float:
    return statistics.median(times)


def p95(times: list[float]) -> float:
    return sorted(times)[max(0, int(round(0.95 * len(times))) - 1)]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
            cpu = names[0] if names else cpu
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {torch.get_num_threads()} torch threads, {gpu}, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return "" if value is None else str(value)
