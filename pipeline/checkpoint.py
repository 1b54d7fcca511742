"""Checkpoints that explain themselves and never pickle a module.

A checkpoint is a plain dict saved with `torch.save` and read with `weights_only=True`:
`format`, `arch` (registry name, num_classes, in_channels, image_size, options), `state_dict`,
`config` (the resolved params), `classes`, `normalization` (mean/std the inputs need),
`metrics`, `dataset_sha256`. `load_checkpoint` rebuilds the model from `arch` through the
registry and loads the tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.config import Params
from pipeline.errors import DataError
from pipeline.io import atomic_path
from pipeline.models import create_model

FORMAT = "pipeline.checkpoint/1"


def arch_spec(params: Params, info: dict) -> dict:
    """The registry call that builds this model, as plain data."""
    m = params.model
    return {
        "name": m.name,
        "num_classes": len(info["classes"]),
        "in_channels": int(info["shape"][0]),
        "image_size": int(info["shape"][1]),
        "options": {
            "widths": list(m.widths),
            "depth": m.depth,
            "hidden": list(m.hidden),
            "dropout": m.dropout,
        },
    }


def build_model(arch: dict) -> nn.Module:
    return create_model(
        arch["name"],
        arch["num_classes"],
        arch["in_channels"],
        arch["image_size"],
        **arch["options"],
    )


def save_checkpoint(
    path: str | Path, model: nn.Module, arch: dict, params: Params, info: dict, metrics: dict
) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = {
        "format": FORMAT,
        "arch": arch,
        "state_dict": state,
        "config": params.to_dict(),
        "classes": list(info["classes"]),
        "normalization": {"mean": list(info["mean"]), "std": list(info["std"])},
        "metrics": metrics,
        "dataset_sha256": info["sha256"]["all"],
    }
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """(model in eval mode on the CPU, the checkpoint dict)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found; run the stage that writes it")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("format") != FORMAT:
        raise DataError(f"{path}: not a pipeline checkpoint (format {blob.get('format')!r})")
    model = build_model(blob["arch"])
    model.load_state_dict(blob["state_dict"])
    return model.eval(), blob
