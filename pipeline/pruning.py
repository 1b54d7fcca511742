"""Structured channel pruning with Torch-Pruning (DepGraph), fine-tuned with the shared engine.

- `prune_and_finetune(model, data, ratio, compress_cfg, train_cfg)`: removes `ratio` of the
  channels of every prunable layer (L2 magnitude importance, the same ratio per layer, widths
  rounded to a multiple of `round_to`) in `prune_steps` steps, fine-tuning with
  `pipeline.engine.fit` after each. The classifier and a torchvision input adapter keep their
  width (`protected_layers`).
- `finetune_config(train_cfg, compress_cfg)`: fine-tuning is fine-tuning, not a second
  training run: the tuned model's settings with a lower peak (`compress.finetune_lr`, default
  the tuned `train.lr` / 2) and a cosine decay from it, no warm-up (the tuned OneCycle schedule
  would climb back to the tuned peak first). Why / 2, measured on the default digits run
  (ratio 0.5, 8 seeds, val points lost vs the tuned model, 1-point budget): lr / 10 lost
  1.11-1.48 on every seed (over budget: the stage backs off to a smaller ratio), lr / 3 lost
  0.83 on average and was over budget on 3 of 8 seeds; lr / 2 lost 0.74 (1 of 8 over), as the
  old OneCycle (0.65) and a cosine from the full lr (0.42) did, within one image of 270. On the
  later default tuned model (lr 0.05): lr / 10 lost 0.79, lr / 2 0.00, OneCycle gained 0.23.
- `count_macs_params(model, example)`: multiply-accumulates per image and parameters.
- `pruned_widths(...)`: the widths a ratio gives, without fine-tuning (cheap; used to skip
  ratios that round to a network already tried).

The pruned model is a plain `nn.Module`; `pipeline.checkpoint.pruned_spec` records its widths.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import torch
from torch import nn

from pipeline.checkpoint import pruned_spec
from pipeline.config import CompressConfig, TrainConfig
from pipeline.data import DeviceData
from pipeline.engine import EpochCallback, FitResult, fit
from pipeline.models import ChannelAdapter


def count_macs_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(multiply-accumulates for one image, parameters), counted by Torch-Pruning."""
    import torch_pruning as tp

    macs, n_params = tp.utils.count_ops_and_params(model.eval(), example[:1])
    return int(macs), int(n_params)


def protected_layers(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """Layers whose output width must stay: the classifier (the last conv / linear to run)
    and the 1x1 conv that adapts the input channels of a torchvision model."""
    ran = []
    hooks = [
        m.register_forward_hook(lambda module, inputs, output: ran.append(module))
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
    ]
    try:
        with torch.no_grad():
            model.eval()(example[:1])
    finally:
        for hook in hooks:
            hook.remove()
    return ran[-1:] + [m.adapt for m in model.modules() if isinstance(m, ChannelAdapter)]


def finetune_schedule(cfg: CompressConfig) -> list[int]:
    """Fine-tuning epochs after each pruning step (0: none)."""
    if cfg.finetune_epochs == 0:
        return [0] * cfg.prune_steps
    between = max(1, cfg.finetune_epochs // cfg.prune_steps)
    return [between] * (cfg.prune_steps - 1) + [cfg.finetune_epochs]


def finetune_config(train_cfg: TrainConfig, cfg: CompressConfig) -> TrainConfig:
    """The tuned `train_cfg` with lr `cfg.finetune_lr` (null: train lr / 2) and a cosine decay
    from it to zero over each fine-tune, without warm-up (the engine's `scheduler: cosine`)."""
    lr = cfg.finetune_lr if cfg.finetune_lr is not None else train_cfg.lr / 2
    return dataclasses.replace(train_cfg, lr=lr, scheduler="cosine")


def prune_and_finetune(
    model: nn.Module,
    data: DeviceData,
    ratio: float,
    cfg: CompressConfig,
    train_cfg: TrainConfig,
    *,
    seed: int = 0,
    on_epoch: EpochCallback | None = None,
) -> list[FitResult]:
    """Prune `model` in place to `ratio` in `cfg.prune_steps` steps, fine-tuning after each
    with `finetune_config(train_cfg, cfg)` (`train_cfg`: the tuned model's training settings).

    Returns the engine's result of every fine-tune; stops after one that diverged.
    """
    import torch_pruning as tp

    if ratio == 0:
        return []
    example = data.x["train"][:2]
    model.to(data.device).eval()
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio,
        iterative_steps=cfg.prune_steps,
        round_to=cfg.round_to if cfg.round_to > 1 else None,
        ignored_layers=protected_layers(model, example),
    )
    finetune = finetune_config(train_cfg, cfg)
    results = []
    for step, epochs in enumerate(finetune_schedule(cfg), start=1):
        pruner.step()
        if epochs == 0:
            continue
        description = f"fine-tune {step}/{cfg.prune_steps} (ratio {ratio:g})"
        result = fit(
            model,
            data,
            finetune,
            seed=seed + step,
            epochs=epochs,
            on_epoch=on_epoch,
            description=description,
        )
        results.append(result)
        if result.status != "ok":
            break
    return results


def pruned_widths(
    model: nn.Module, data: DeviceData, ratio: float, cfg: CompressConfig, train_cfg: TrainConfig
) -> str:
    """The layer widths that pruning `model` to `ratio` gives (pruned without fine-tuning)."""
    probe = copy.deepcopy(model)
    no_finetune = dataclasses.replace(cfg, finetune_epochs=0)
    prune_and_finetune(probe, data, ratio, no_finetune, train_cfg)
    return json.dumps(pruned_spec(model, probe)["layers"], sort_keys=True)
