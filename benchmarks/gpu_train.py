"""GPU fast path: our engine with fp32 eager vs bf16 autocast + channels_last (+ torch.compile).

Trains `cnn` and `resnet` on CIFAR-shaped synthetic data with `pipeline.engine.fit`, prints
images/s (epochs after the first, so cuDNN autotuning and compilation are excluded), the ratio
to fp32 eager and the achieved TFLOP/s (forward + backward FLOPs counted by
`torch.utils.flop_counter`) against the card's bf16 dense peak; then times inference of the
tuned model (models/tuned.pt when present, else the benchmark's cnn) through PyTorch in fp32
and fp16 on the GPU. Needs CUDA.

    python benchmarks/gpu_train.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine, p50, print_table, synthetic_prepared, timed  # noqa: E402

from pipeline.config import TrainConfig  # noqa: E402
from pipeline.data import DeviceData  # noqa: E402
from pipeline.engine import fit  # noqa: E402
from pipeline.models import create_model  # noqa: E402

DEVICE = "cuda"
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}
MODELS = {
    "cnn": {"widths": (128, 256, 512)},
    "resnet": {"depth": 20, "widths": (64, 128, 256)},
}


def train_flops_per_image(name: str, options: dict, batch: int = 8) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model = create_model(name, 10, 3, 32, **options).to(DEVICE)
    x = torch.randn(batch, 3, 32, 32, device=DEVICE)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / batch


def peak_tflops() -> float | None:
    if DEVICE != "cuda":
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def measure(name: str, options: dict, data: DeviceData, cfg: TrainConfig) -> float:
    torch.manual_seed(0)
    model = create_model(name, 10, 3, 32, **options)
    result = fit(model, data, cfg, progress=False)
    assert result.status == "ok", result.message
    images = (len(data.y["train"]) // cfg.batch_size) * cfg.batch_size
    steady = [h["seconds"] for h in result.history[1:]]
    return images / (sum(steady) / len(steady))


def train_table(quick: bool, n_train: int | None = None) -> list[dict]:
    prepared = synthetic_prepared(n_train or (10_000 if quick else 25_000))
    data_plain = DeviceData(prepared, torch.device(DEVICE), channels_last=False)
    data_cl = DeviceData(prepared, torch.device(DEVICE), channels_last=DEVICE == "cuda")
    base = TrainConfig(epochs=3 if quick else 4, batch_size=512, lr=0.05, augment="crop_flip")
    variants = {
        "fp32 eager": (dataclasses.replace(base, amp=False, channels_last=False), data_plain),
        "bf16 + channels_last": (dataclasses.replace(base, amp=True, channels_last=True), data_cl),
        "bf16 + channels_last + compile": (
            dataclasses.replace(base, amp=True, channels_last=True, compile=True),
            data_cl,
        ),
    }
    peak = peak_tflops()
    rows = []
    for name, options in MODELS.items():
        flops = train_flops_per_image(name, options)
        baseline = None
        for variant, (cfg, data) in variants.items():
            ips = measure(name, options, data, cfg)
            baseline = baseline or ips
            tflops = ips * flops / 1e12
            rows.append(
                {
                    "model": name,
                    "variant": variant,
                    "images/s": ips,
                    "vs fp32": ips / baseline,
                    "TFLOP/s": tflops,
                    "% of bf16 peak": 100 * tflops / peak if peak else None,
                }
            )
    return rows


def inference_table() -> list[dict]:
    ckpt = Path("models/tuned.pt")
    if ckpt.is_file():
        from pipeline.checkpoint import load_checkpoint

        model, blob = load_checkpoint(ckpt)
        shape = (
            blob["arch"]["in_channels"],
            blob["arch"]["image_size"],
            blob["arch"]["image_size"],
        )
        source = "models/tuned.pt"
    else:
        model, shape, source = create_model("cnn", 10, 3, 32).eval(), (3, 32, 32), "cnn 3x32x32"
    rows = []
    sync = torch.cuda.synchronize if DEVICE == "cuda" else None
    for dtype_name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        m = model.to(DEVICE, dtype).eval()
        x1 = torch.randn(1, *shape, device=DEVICE, dtype=dtype)
        x64 = torch.randn(64, *shape, device=DEVICE, dtype=dtype)
        with torch.inference_mode():
            lat = timed(lambda m=m, x1=x1: m(x1), 200, 20, sync)
            thr = timed(lambda m=m, x64=x64: m(x64), 100, 10, sync)
        rows.append(
            {
                "model": source,
                "dtype": dtype_name,
                "p50 ms b1": 1000 * p50(lat),
                "images/s b64": 64 / p50(thr),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of this script")
    parser.add_argument("--n-train", type=int, default=None)
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure")
        return
    print(f"machine: {machine()}")
    rows = train_table(args.quick, args.n_train)
    print_table(rows, ["model", "variant", "images/s", "vs fp32", "TFLOP/s", "% of bf16 peak"])
    print()
    print_table(inference_table(), ["model", "dtype", "p50 ms b1", "images/s b64"])
    resnet = {r["variant"]: r["images/s"] for r in rows if r["model"] == "resnet"}
    print(f"speedup: {resnet['bf16 + channels_last'] / resnet['fp32 eager']:.2f}x")


if __name__ == "__main__":
    main()
