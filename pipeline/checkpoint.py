"""Checkpoints that explain themselves and never pickle a module.

A checkpoint is a plain dict saved with `torch.save` and read with `weights_only=True`:
`format`, `arch` (registry name, num_classes, in_channels, image_size, options), `state_dict`,
`config` (the resolved params), `classes`, `normalization` (mean/std the inputs need),
`metrics`, `dataset_sha256`. `load_checkpoint` rebuilds the model from `arch` through the
registry and loads the tensors.

A structurally pruned model (Torch-Pruning, see `pipeline.compress`) has the dense registry
architecture with narrower layers. Its `arch` carries a `pruned` entry, made by `pruned_spec`:
`layers` (module name -> the width attributes that changed, e.g. `out_channels`) and `shapes`
(state_dict key -> tensor shape, for every tensor whose shape changed). `build_model` builds the
dense model and narrows it to those widths and shapes, so a pruned checkpoint is plain data too.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.config import Params
from pipeline.errors import DataError, UserError
from pipeline.files import atomic_path, load_tensors
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
    """The registry model `arch` describes; narrowed to its pruned widths when it has them."""
    model = create_model(
        arch["name"],
        arch["num_classes"],
        arch["in_channels"],
        arch["image_size"],
        **arch["options"],
    )
    if arch.get("pruned"):
        apply_pruned_spec(model, arch["pruned"])
    return model


# Module attributes that hold a layer's width; Torch-Pruning rewrites exactly these.
_WIDTH_ATTRS = (
    (nn.modules.conv._ConvNd, ("in_channels", "out_channels", "groups")),
    (nn.Linear, ("in_features", "out_features")),
    (nn.modules.batchnorm._BatchNorm, ("num_features",)),
    (nn.GroupNorm, ("num_groups", "num_channels")),
    (nn.LayerNorm, ("normalized_shape",)),
)


def _width_attrs(module: nn.Module) -> dict:
    """The width attributes of a conv / linear / norm layer as plain data ({} for others)."""
    for cls, names in _WIDTH_ATTRS:
        if isinstance(module, cls):
            values = {n: getattr(module, n) for n in names}
            return {n: list(v) if isinstance(v, tuple) else v for n, v in values.items()}
    return {}


def pruned_spec(dense: nn.Module, pruned: nn.Module) -> dict:
    """What pruning changed, as plain data: `layers` (width attributes) and `shapes`."""
    dense_modules = dict(dense.named_modules())
    layers = {}
    for name, module in pruned.named_modules():
        widths, before = _width_attrs(module), _width_attrs(dense_modules[name])
        changed = {k: v for k, v in widths.items() if before.get(k) != v}
        if changed:
            layers[name] = changed
    dense_state = dense.state_dict()
    shapes = {
        key: list(tensor.shape)
        for key, tensor in pruned.state_dict().items()
        if tuple(tensor.shape) != tuple(dense_state[key].shape)
    }
    return {"layers": layers, "shapes": shapes}


def apply_pruned_spec(model: nn.Module, spec: dict) -> nn.Module:
    """Narrow a freshly built dense `model` in place to `spec`'s widths and tensor shapes.

    The tensors are zero placeholders of the recorded shapes: load the state_dict afterwards.
    """
    modules = dict(model.named_modules())
    for name, attrs in spec.get("layers", {}).items():
        for attr, value in attrs.items():
            setattr(modules[name], attr, tuple(value) if isinstance(value, list) else value)
    for key, shape in spec.get("shapes", {}).items():
        owner_name, _, leaf = key.rpartition(".")
        owner = modules[owner_name]
        old = getattr(owner, leaf)
        new = torch.zeros(shape, dtype=old.dtype)
        if isinstance(old, nn.Parameter):
            setattr(owner, leaf, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            owner._buffers[leaf] = new
    return model


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
    blob = load_tensors(path, "checkpoint")
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise DataError(f"{path}: not a pipeline checkpoint (format {found!r})")
    try:
        model = build_model(blob["arch"])
        model.load_state_dict(blob["state_dict"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, UserError) as err:
        reason = " ".join(str(err).split())[:160]
        raise DataError(
            f"{path}: damaged checkpoint, its tensors do not match its architecture "
            f"({type(err).__name__}: {reason})"
        ) from None
    return model.eval(), blob
