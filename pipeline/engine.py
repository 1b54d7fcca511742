"""The one training engine: baseline training, every search trial and every fine-tune use it.

- The whole split lives on the device as a normalised tensor (`pipeline.data.DeviceData`);
  batches are index slices from a seeded permutation, augmented on the device (random crop
  with padding, horizontal flip) - no DataLoader, no per-sample Python.
- `train.channels_last`: NHWC memory format for model and batches while training, on every
  device (on a 2-core CPU the CIFAR-shaped `cnn` trains 1.4x faster: max-pooling and oneDNN
  convolutions skip their layout reorders); the model leaves `fit` in the default layout.
- CUDA: bf16 autocast (`train.amp`); optional `torch.compile`. CPU: bf16 autocast of the
  training step with `train.amp_cpu` on CPUs with native bf16 (AVX512-BF16 / AMX; 1.4x on
  the CIFAR-shaped `cnn`, nothing on 8x8 digits, slower on `lenet`); evaluation stays fp32.
- Optimizer updates by multi-tensor (foreach) kernels; no host sync inside an epoch (loss and
  correct counts accumulate on the device).
- Under torchrun (an initialised process group of N > 1 ranks, `pipeline.distributed`):
  DistributedDataParallel; `cfg.batch_size` is the global batch, each rank trains on its
  `batch_size / N` slice of every step's batch; loss and accuracy are all-reduced.
  One process: none of this runs.
- `on_epoch(epoch, metrics)` is called after each epoch (Optuna pruning, MLflow logging live
  in the caller; this module never imports MLflow). It may raise to stop training.
- A NaN / infinite loss ends training with `status="diverged"` and a message, not garbage.
- A tqdm bar over epochs, quiet when stderr is not a terminal. Deterministic on CPU.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pipeline import distributed
from pipeline.config import TrainConfig
from pipeline.data import DeviceData

EpochCallback = Callable[[int, dict], None]


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` -> cuda when available, else cpu. Asking for cuda without one falls back to cpu."""
    if name == "cuda" and not torch.cuda.is_available():
        import warnings

        warnings.warn("device: cuda requested but not available; using cpu", stacklevel=2)
        return torch.device("cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class FitResult:
    status: str  # "ok" or "diverged"
    message: str
    history: list[dict] = field(default_factory=list)  # one dict of metrics per epoch
    train_seconds: float = 0.0
    images_per_second: float = 0.0
    device: str = "cpu"
    processes: int = 1  # data-parallel ranks (torchrun); batch and images/s are global

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    @property
    def val_accuracy(self) -> float:
        return self.history[-1]["val_accuracy"] if self.history else 0.0


def autocast_context(device: torch.device, amp: bool):
    if device.type == "cuda" and amp and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_has_bf16() -> bool:
    """True when the CPU does bf16 arithmetic natively (AVX512-BF16 or AMX); elsewhere oneDNN
    emulates it, slower than fp32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def train_autocast(device: torch.device, cfg: TrainConfig):
    """The training step's autocast: bf16 on CUDA (`train.amp`) and, with `train.amp_cpu`, on
    CPUs with native bf16. Evaluation on the CPU stays fp32 (`evaluate`)."""
    if device.type == "cpu":
        if cfg.amp_cpu and cpu_has_bf16():
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()
    return autocast_context(device, cfg.amp)


def augment_batch(x: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Random crop with padding (size/8 px, at least 1) and, for crop_flip, horizontal flip."""
    if mode == "none":
        return x
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device, generator=generator)
    rows = (dy + torch.arange(h, device=x.device))[:, :, None]  # n, h, 1
    cols = (dx + torch.arange(w, device=x.device))[:, None, :]  # n, 1, w
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    if mode == "crop_flip":
        flip = torch.rand(n, device=x.device, generator=generator) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    nhwc = x.is_contiguous(memory_format=torch.channels_last)
    return out.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer, its update done by multi-tensor (foreach) kernels on every device (on
    the CPU PyTorch's default is one tensor at a time: several small ops per parameter)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
            foreach=True,
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)


def make_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=0.25
        )
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return None


@torch.no_grad()
def predict_logits(
    model: nn.Module, x: torch.Tensor, batch_size: int = 1024, amp: bool = True
) -> torch.Tensor:
    """Logits (float32) for normalised inputs `x`, in eval mode, batch by batch."""
    was_training = model.training
    model.eval()
    outs = []
    with autocast_context(x.device, amp):
        for start in range(0, len(x), batch_size):
            outs.append(model(x[start : start + batch_size]).float())
    model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool = True):
    """(mean cross-entropy loss, top-1 accuracy) on one split."""
    logits = predict_logits(model, x, amp=amp)
    loss = F.cross_entropy(logits, y).item()
    accuracy = (logits.argmax(1) == y).float().mean().item()
    return loss, accuracy


def correct_per_image(model: nn.Module, data: DeviceData, split: str = "val"):
    """Per-image top-1 correctness (numpy bool) on one split, fp32 (no autocast) on
    `data.device`: how every decision that compares two PyTorch models scores them."""
    logits = predict_logits(model.to(data.device), data.x[split], amp=False)
    return (logits.argmax(1) == data.y[split]).cpu().numpy()


def resolve_augment(cfg: TrainConfig, data: DeviceData) -> str:
    return data.info.get("augment", "none") if cfg.augment == "auto" else cfg.augment


def fit(
    model: nn.Module,
    data: DeviceData,
    cfg: TrainConfig,
    *,
    seed: int = 0,
    epochs: int | None = None,
    on_epoch: EpochCallback | None = None,
    progress: bool = True,
    description: str = "train",
) -> FitResult:
    """Train `model` in place on `data.x['train']`, evaluating on `val` after each epoch.

    Args:
        model: any registry model (moved to `data.device` here).
        data: the splits on the training device.
        cfg: optimiser, schedule, batch size, augmentation, amp/compile switches.
        seed: seeds the batch order and augmentation (and torch's global RNG for dropout).
        epochs: overrides `cfg.epochs` (search trials, fine-tuning).
        on_epoch: called as `on_epoch(epoch, metrics)` with epoch counted from 1.
        progress: show a tqdm bar when stderr is a terminal.

    Returns:
        FitResult with per-epoch history; `status` is "diverged" if the loss became NaN/inf.
    """
    device = data.device
    epochs = epochs or cfg.epochs
    torch.manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    model.to(device)
    x_train, y_train = data.x["train"], data.y["train"]
    channels_last = cfg.channels_last and x_train.dim() == 4
    if channels_last:
        model.to(memory_format=torch.channels_last)
    n = len(y_train)
    batch_size = min(cfg.batch_size, n)
    world = distributed.active_world_size()
    shard, augment_generator, train_model = slice(0, batch_size), generator, model
    if world > 1:  # under torchrun: DDP, each rank its slice of every global batch
        batch_size = min(cfg.batch_size, n - n % world)
        per_rank = distributed.per_rank_batch(batch_size, world)
        shard = distributed.rank_slice(distributed.rank(), per_rank)
        # the permutation stays shared (same seed); augmentation draws differ per rank
        augment_generator = torch.Generator(device=device).manual_seed(
            seed + 1_000_003 * (distributed.rank() + 1)
        )
        train_model = distributed.wrap_model(model, device)
    step_model = torch.compile(train_model) if cfg.compile else train_model
    steps_per_epoch = n // batch_size  # drop the last partial batch: stable BN statistics
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, epochs * steps_per_epoch)
    augment = resolve_augment(cfg, data)
    if device.type == "cpu" and cfg.amp_cpu and not cpu_has_bf16():
        import warnings

        warnings.warn(
            "train.amp_cpu: this CPU has no native bf16 (AVX512-BF16 or AMX); training in fp32",
            stacklevel=2,
        )
    result = FitResult("ok", "", device=str(device), processes=world)
    bar = tqdm(
        range(1, epochs + 1),
        desc=description,
        unit="epoch",
        disable=None if progress else True,
        leave=False,
    )
    try:
        for epoch in bar:
            model.train()
            start = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            order = torch.randperm(n, device=device, generator=generator)
            for step in range(steps_per_epoch):
                idx = order[step * batch_size : (step + 1) * batch_size][shard]
                xb = x_train[idx]
                # NHWC before augmenting (which keeps the layout); a no-op if stored NHWC
                if channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                xb, yb = augment_batch(xb, augment, augment_generator), y_train[idx]
                with train_autocast(device, cfg):
                    logits = step_model(xb)
                    loss = F.cross_entropy(logits.float(), yb, label_smoothing=cfg.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                loss_sum += loss.detach()
                correct += (logits.argmax(1) == yb).sum()
            if world > 1:  # every rank sees the global metrics and scores rank 0's model
                totals = torch.stack([loss_sum.double(), correct.double()])
                distributed.all_reduce_sum(totals)
                loss_sum, correct = totals[0] / world, totals[1]
                distributed.broadcast_buffers(model)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            result.train_seconds += seconds
            train_loss = loss_sum.item() / max(steps_per_epoch, 1)
            if not math.isfinite(train_loss):
                result.status = "diverged"
                result.message = (
                    f"training loss became {train_loss} in epoch {epoch} (lr={cfg.lr:g})"
                )
                break
            val_loss, val_accuracy = evaluate(model, data.x["val"], data.y["val"], cfg.amp)
            metrics = {
                "epoch": epoch,
                "train_loss": round(train_loss, 6),
                "train_accuracy": round(correct.item() / (steps_per_epoch * batch_size), 6),
                "val_loss": round(val_loss, 6),
                "val_accuracy": round(val_accuracy, 6),
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": round(seconds, 4),
            }
            result.history.append(metrics)
            bar.set_postfix(loss=f"{train_loss:.3f}", val_acc=f"{val_accuracy:.3f}")
            if on_epoch is not None:
                on_epoch(epoch, metrics)
    finally:
        bar.close()
        if channels_last:  # callers, checkpoints and exporters see the default layout
            model.to(memory_format=torch.contiguous_format)
    images = steps_per_epoch * batch_size * result.epochs_run
    result.images_per_second = images / result.train_seconds if result.train_seconds else 0.0
    return result
