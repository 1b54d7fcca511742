"""The search space (`search.space`): what a trial draws, and the params it trains with.

- `lr`, `weight_decay`: log-uniform in [low, high]; `batch_size`: a choice.
- `width` (optional): a multiplier of `model.widths` (cnn, resnet) and `model.hidden` (mlp),
  drawn on a grid of `config.WIDTH_STEP` in [low, high]; each layer gets
  max(1, round(multiplier x its width)) channels, so the study holds few architectures and each
  is timed once (`pipeline.arch_cost`).
- `depth` (optional, resnet): a choice of depths.

`trial_params(params, hp)` is the whole recipe a trial trains with (model scaled, train fields
replaced, `search.epochs` as `train.epochs`): the search stage ships its chosen trial's model
(or retrains it with exactly that), so the checkpoint's config and architecture are the trial's.
"""

from __future__ import annotations

import dataclasses

from pipeline.config import WIDTH_STEP, ModelConfig, Params

TRAIN_KEYS = ("lr", "batch_size", "weight_decay")


def suggest(trial, params: Params) -> dict:
    """Draw one point of `search.space` on an Optuna trial (the params' names are its keys)."""
    space = params.search.space
    hp = {
        "lr": trial.suggest_float("lr", *space.lr, log=True),
        "batch_size": trial.suggest_categorical("batch_size", list(space.batch_size)),
        "weight_decay": trial.suggest_float("weight_decay", *space.weight_decay, log=True),
    }
    if space.width is not None:
        hp["width"] = trial.suggest_float("width", *space.width, step=WIDTH_STEP)
    if space.depth is not None:
        hp["depth"] = trial.suggest_categorical("depth", list(space.depth))
    return hp


def scaled_model(model: ModelConfig, width: float | None, depth: int | None) -> ModelConfig:
    """`model` with its widths and hidden sizes multiplied by `width`, and `depth` (None: kept)."""
    changes = {}
    if width is not None:
        changes["widths"] = tuple(max(1, round(c * width)) for c in model.widths)
        changes["hidden"] = tuple(max(1, round(c * width)) for c in model.hidden)
    if depth is not None:
        changes["depth"] = depth
    return dataclasses.replace(model, **changes)


def trial_params(params: Params, hp: dict) -> Params:
    """The params a trial with `hp` trains with (see the module doc)."""
    train = dataclasses.replace(
        params.train, **{k: hp[k] for k in TRAIN_KEYS}, epochs=params.search.epochs
    )
    model = scaled_model(params.model, hp.get("width"), hp.get("depth"))
    return dataclasses.replace(params, model=model, train=train)


def current_point(params: Params) -> dict | None:
    """params.yaml's own point (its train fields, width 1, its depth), when the space holds it."""
    train, space = params.train, params.search.space
    point = {k: getattr(train, k) for k in TRAIN_KEYS}
    inside = (
        space.lr[0] <= train.lr <= space.lr[1]
        and train.batch_size in space.batch_size
        and space.weight_decay[0] <= train.weight_decay <= space.weight_decay[1]
    )
    if space.width is not None:
        point["width"] = 1.0
        inside = inside and space.width[0] <= 1.0 <= space.width[1]
    if space.depth is not None:
        point["depth"] = params.model.depth
        inside = inside and params.model.depth in space.depth
    return point if inside else None


def architecture(hp: dict) -> str:
    """The searched architecture of a trial as a short label ('' when none is searched)."""
    parts = [f"{k} {hp[k]:g}" for k in ("width", "depth") if hp.get(k) is not None]
    return ", ".join(parts)
