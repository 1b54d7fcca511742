"""Our engine against airbench (issue 14): the same CIFAR-10 network, batch and data, images/s.

airbench (Keller Jordan's published fast CIFAR-10 trainer, PyPI `airbench==0.1.8`) trains its
`make_net94` network at a known rate. Both sides train that network on the same synthetic
CIFAR-shaped images (`synthetic_prepared`: 50,000 train, 5,000 val), written for airbench in its
own `cifar10/train.pt` / `test.pt` format (uint8 N x 32 x 32 x 3) into a temporary directory
this script runs airbench in, so nothing is downloaded. Batch 1024 on both sides. Measured:

- `airbench train94`: its own `train94` as published (its GPU loader: 2 px reflect-pad
  translate and whole-set flip every other epoch; fp16 weights and activations, BatchNorm in
  fp32, channels_last; SGD Nesterov, label smoothing 0.2, lookahead every 5 steps). Steady
  state: after a 1-epoch warm-up run, runs of E1 and E2 epochs timed end to end (wall clock
  between `torch.cuda.synchronize()` calls); images/s = (E2 - E1) x len(loader) x 1024 / (t2 -
  t1), so its set-up (net, whitening init, loading and preprocessing the data) cancels; the
  median of R such pairs.
- `ours`: `pipeline.engine.fit` on make_net94 (same seed, its whitening conv initialised by
  airbench's `init_whitening_conv`, frozen layers as airbench freezes them), SGD Nesterov with
  airbench's momentum 0.85, label smoothing 0.2, `augment="crop_flip"` (4 px zero-pad crop and
  per-image flip, drawn per batch), channels_last; images/s over the epochs after the first
  (`history[1:]` `seconds`: training only, evaluation excluded). Rows:
    `fp16`: the net as make_net94 builds it and fp16 inputs, no autocast: airbench's precision;
      the comparable setting (`speedup` is its images/s over airbench's).
    `bf16 autocast`: make_net94 in fp32 (`.float()`) with `TrainConfig(amp=True)`, how the
      pipeline trains (fp32 master weights, bf16 compute); also with `compile=True`, and with
      cudnn.benchmark off (the pipeline's default; `import airbench` turns it on process-wide,
      so every other row runs with it on, as airbench does).
- TFLOP/s: forward + backward FLOPs per image (convolutions and matrix products, counted by
  `torch.utils.flop_counter.FlopCounterMode` on the net) x images/s, and its share of the
  card's dense bf16 peak (`gpu_train.PEAK_BF16_TFLOPS`; dense fp16 peak is the same on
  A100/H100/H200).

Not equal between the sides (the table's notes repeat it): precision of the bf16 rows (fp32
master weights + bf16 autocast against airbench's fp16 weights and activations); augmentation
(above); airbench's lookahead, two parameter groups, summed loss and whitening-bias freeze after
3 epochs against our one group and mean loss; learning-rate schedules. `val acc` only shows that
each run learned the synthetic labels; epochs and schedules differ, so it is no comparison.

    python benchmarks/vs_airbench.py [--quick] [--device cpu]

`--device cpu`: a smoke run (our rows on make_net94 at a tiny size, airbench's file format and
loader, the FLOP count, the table); airbench's `train94` needs CUDA and is skipped. Needs
`airbench` importable: `make device-wheels` puts its wheel in .whl/, which gpu_check.sh installs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine, print_table, synthetic_prepared  # noqa: E402
from gpu_train import peak_tflops  # noqa: E402

from pipeline.config import TrainConfig  # noqa: E402
from pipeline.data import DeviceData, Prepared  # noqa: E402
from pipeline.engine import fit  # noqa: E402

AIRBENCH_VERSION = "0.1.8"
# (E1, E2) epochs of the timed airbench runs, pairs, epochs of each of our runs
PLAN = {"full": ((2, 10), 3, 6), "quick": ((1, 4), 1, 3)}
# CPU smoke run: 4 steps per epoch (OneCycleLR needs 5 or more; fp16 convolutions crawl on a CPU)
CPU_BATCH = 16
# Peak SGD lr on the mean loss. airbench's, 11.5 / (1 + 1 / 0.15) / 1024 on the summed loss of a
# 1024 batch, is 1.5 on the mean; a little lower without its lookahead (trains in fp32 and fp16)
OURS_LR = 1.0
FP16 = "fp16 weights + activations"
COLUMNS = ["trainer", "precision", "variant", "images/s", "vs airbench", "TFLOP/s"]
COLUMNS += ["% of bf16 peak", "val acc", "note"]


def import_airbench():
    """airbench, or exit with one line saying how to carry it (the GPU machine has no
    internet)."""
    try:
        import airbench
    except ImportError as error:  # airbench itself, or torchvision it imports
        raise SystemExit(
            f"vs_airbench: cannot import airbench ({error}); run `make device-wheels` to put "
            f"airbench=={AIRBENCH_VERSION} in .whl/, which benchmarks/gpu_check.sh installs"
        ) from None
    return airbench


@contextlib.contextmanager
def cuda_is_noop():
    """CPU smoke path only: make_net94 ends in `.half().cuda()`; with `Module.cuda` a no-op it
    builds the same modules, dtypes and layout on the CPU. Restored on exit."""
    original = nn.Module.cuda
    nn.Module.cuda = lambda self, device=None: self
    try:
        yield
    finally:
        nn.Module.cuda = original


def airbench_net(airbench, device: torch.device, fp16: bool, train_x=None) -> nn.Module:
    """make_net94 as published (fp16 weights, fp32 BatchNorm), or in fp32; with `train_x`, its
    whitening conv initialised from the first 5,000 training images, as `train94` does."""
    torch.manual_seed(0)
    with contextlib.nullcontext() if device.type == "cuda" else cuda_is_noop():
        net = airbench.make_net94()
    if not fp16:
        net = net.float()
    if train_x is not None:
        airbench.utils.init_whitening_conv(net[0], train_x[:5000])
    return net


def train_flops_per_image(net: nn.Module, device: torch.device, batch: int = 8) -> float:
    """Forward + backward FLOPs per image, the net's frozen layers as they are (on a copy)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = copy.deepcopy(net).float().to(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    with FlopCounterMode(display=False) as counter:
        net(x).sum().backward()
    return counter.get_total_flops() / batch


def write_airbench_files(prepared: Prepared, folder: Path) -> None:
    """The train and val splits as airbench's `CifarLoader` reads them (uint8 N x H x W x C)."""
    folder.mkdir(parents=True)
    for file_name, split in (("train.pt", "train"), ("test.pt", "val")):
        images, labels = prepared.splits[split]
        blob = {
            "images": images.permute(0, 2, 3, 1).contiguous(),
            "labels": labels,
            "classes": prepared.info["classes"],
        }
        torch.save(blob, folder / file_name)


@contextlib.contextmanager
def airbench_workdir(prepared: Prepared):
    """A temporary working directory holding cifar10/*.pt, where airbench looks for them."""
    previous = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="vs_airbench_") as tmp:
        write_airbench_files(prepared, Path(tmp) / "cifar10")
        os.chdir(tmp)
        try:
            yield
        finally:
            os.chdir(previous)


def airbench_loader(airbench, batch: int, device: torch.device):
    """The training loader `train94` builds when given none (its hyperparameters)."""
    hyp = airbench.lib_airbench94.hyp
    gpu = 0 if device.type == "cuda" else "cpu"
    return airbench.CifarLoader(
        "cifar10", train=True, batch_size=batch, aug=hyp["aug"], altflip=True, gpu=gpu
    )


def check_airbench_loader(loader, n_train: int) -> None:
    """One epoch of airbench's loader yields the images written: the file format is right."""
    seen = sum(len(labels) for _, labels in loader)
    expected = len(loader) * loader.batch_size
    if len(loader.labels) != n_train or seen != expected:
        raise SystemExit(f"airbench loader: {len(loader.labels)} images, {seen} per epoch")


def airbench_train(airbench, loader, epochs: tuple[int, int], pairs: int) -> tuple[float, float]:
    """(steady-state images/s, val accuracy after the last long run) of `train94`."""

    def timed_run(n_epochs: int):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model = airbench.train94(loader, epochs=n_epochs, verbose=False)
        torch.cuda.synchronize()
        return time.perf_counter() - start, model

    timed_run(1)  # warm-up: CUDA context, cuDNN autotuning, kernel loading
    short, long = epochs
    differences = []
    for _ in range(pairs):
        seconds_short, _ = timed_run(short)
        seconds_long, model = timed_run(long)
        differences.append(seconds_long - seconds_short)
    images = (long - short) * len(loader) * loader.batch_size
    test_loader = airbench.CifarLoader("cifar10", train=False, batch_size=2000)
    return images / statistics.median(differences), airbench.evaluate(model, test_loader)


def ours_train(net: nn.Module, data: DeviceData, cfg: TrainConfig) -> tuple[float, float]:
    """(steady-state images/s over the epochs after the first, final val accuracy)."""
    result = fit(net, data, cfg, progress=False)
    if result.status != "ok":
        raise RuntimeError(result.message)
    steady = [h["seconds"] for h in result.history[1:]]
    images = (len(data.y["train"]) // cfg.batch_size) * cfg.batch_size
    return images / (sum(steady) / len(steady)), result.val_accuracy


def ours_variants(device: torch.device, quick: bool) -> list[tuple[str, bool, dict, bool]]:
    """(variant, fp16 net, TrainConfig changes, cudnn.benchmark) of each of our rows."""
    variants = [
        ("eager", True, {"amp": False}, True),
        ("eager", False, {"amp": True}, True),
        ("compile", False, {"amp": True, "compile": True}, True),
    ]
    if device.type == "cuda" and not quick:
        variants.append(("eager, cudnn.benchmark off", False, {"amp": True}, False))
    return variants


def precision_label(fp16: bool, device: torch.device) -> str:
    if fp16:
        return FP16
    if device.type == "cuda":
        return "fp32 weights, bf16 autocast"
    return "fp32 (CPU: no autocast)"


def ours_rows(airbench, prepared: Prepared, device, batch: int, epochs: int, quick: bool):
    """Our engine's rows; a row that fails says so in its note (the others still run)."""
    data32 = DeviceData(prepared, device, channels_last=True)
    data16 = DeviceData(prepared, device, channels_last=True)
    data16.x = {split: x.half() for split, x in data16.x.items()}  # keeps channels_last
    base = TrainConfig(
        epochs=epochs,
        batch_size=batch,
        lr=OURS_LR,
        momentum=0.85,
        label_smoothing=0.2,
        augment="crop_flip",
        channels_last=True,
    )
    rows = []
    for variant, fp16, changes, benchmark in ours_variants(device, quick):
        data = data16 if fp16 else data32
        net = airbench_net(airbench, device, fp16, data.x["train"])
        row = {
            "trainer": "ours fit",
            "precision": precision_label(fp16, device),
            "variant": variant,
        }
        previous, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, benchmark
        try:
            cfg = dataclasses.replace(base, **changes)
            row["images/s"], row["val acc"] = ours_train(net, data, cfg)
        except Exception as error:  # one failed row must not lose the others
            traceback.print_exc()
            row["note"] = f"failed: {type(error).__name__}: {error}"[:120]
        finally:
            torch.backends.cudnn.benchmark = previous
        rows.append(row)
    return rows


def add_rates(rows: list[dict], flops_per_image: float, peak: float | None) -> None:
    """vs airbench, TFLOP/s and % of the bf16 peak for every row that measured images/s."""
    reference = rows[0].get("images/s") if rows[0]["trainer"].startswith("airbench") else None
    for row in rows:
        if row.get("images/s") is None:
            continue
        row["TFLOP/s"] = row["images/s"] * flops_per_image / 1e12
        row["vs airbench"] = row["images/s"] / reference if reference else None
        row["% of bf16 peak"] = 100 * row["TFLOP/s"] / peak if peak else None


def print_notes(device: torch.device, flops_per_image: float, peak: float | None) -> None:
    print(
        f"\nFLOPs per image (forward + backward, make_net94): {flops_per_image / 1e9:.3f} G; "
        f"card's dense bf16 peak: {f'{peak:g} TFLOP/s' if peak else 'unknown'}"
    )
    others = (
        "fp32 weights, bf16 autocast" if device.type == "cuda" else "fp32, no autocast on a CPU"
    )
    print(
        f"precision: `{FP16}` rows (airbench and ours) keep BatchNorm in fp32;\n"
        f"  our other rows: {others} (the pipeline's training setting)"
    )
    print(
        "not equal: augmentation (airbench 2 px reflect translate, whole-set flip every other "
        "epoch;\n  ours 4 px zero-pad crop, per-image flip), airbench's lookahead, two parameter "
        "groups and summed loss;\n  lr schedules. cudnn.benchmark on (import airbench sets it) "
        "except where the variant says off.\n  val acc: only that each run learned (epochs and "
        "schedules differ)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of this script")
    parser.add_argument("--n-train", type=int, default=None)
    args = parser.parse_args()
    airbench = import_airbench()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure (--device cpu runs a smoke test)")
        return 0
    cuda = device.type == "cuda"
    (ab_epochs, pairs, epochs) = PLAN["quick" if args.quick else "full"]
    batch = airbench.lib_airbench94.hyp["opt"]["batch_size"] if cuda else CPU_BATCH
    epochs = epochs if cuda else 2
    n_train = args.n_train or (50_000 if cuda else 4 * batch)
    print(f"machine: {machine()}")
    print(f"airbench {AIRBENCH_VERSION}, batch {batch}, {n_train:,} synthetic 3x32x32 images")
    prepared = synthetic_prepared(n_train)
    rows = [{"trainer": "airbench train94", "precision": FP16, "variant": "as published"}]
    with airbench_workdir(prepared):
        loader = airbench_loader(airbench, batch, device)
        check_airbench_loader(loader, n_train)
        if cuda:
            rows[0]["images/s"], rows[0]["val acc"] = airbench_train(
                airbench, loader, ab_epochs, pairs
            )
        else:
            rows[0]["note"] = "skipped: train94 needs CUDA (its loader and format were checked)"
    rows += ours_rows(airbench, prepared, device, batch, epochs, args.quick)
    flops = train_flops_per_image(airbench_net(airbench, device, fp16=True), device)
    peak = peak_tflops() if cuda else None
    add_rates(rows, flops, peak)
    print_table(rows, COLUMNS)
    print_notes(device, flops, peak)
    comparable = next(row for row in rows[1:] if row["precision"] == FP16)
    if comparable.get("vs airbench") is None:
        print(f"speedup: n/a ({rows[0].get('note') or comparable.get('note')})")
    else:
        print(f"comparable setting: ours `eager` in {FP16}, as airbench, against train94")
        print(f"speedup: {comparable['vs airbench']:.2f}x")
    return 1 if any("failed" in row.get("note", "") for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
