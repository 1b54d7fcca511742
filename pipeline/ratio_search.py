"""Which pruning ratio the compress stage keeps: one attempt at a ratio, its verdict, the search.

- `prune_attempt(tuned, data, params, tuned_correct, ratio)`: prune and fine-tune a copy of the
  tuned model (`pipeline.pruning`), then compare it with the tuned model on val, paired
  (`pipeline.stats.paired_difference`, PyTorch fp32 on both sides, the same images).
- `judge(difference, max_drop)`: within budget when the point estimate of the paired val
  difference loses at most `max_drop` (why not the interval's bound: below).
- `search_ratio(ratio, backoff_steps, attempt)`: try `ratio`; when over budget, bisect between 0
  and it for `backoff_steps` steps, keeping the largest ratio within budget, or, when none is,
  the most accurate attempt on val.
- `reuse_equal_widths(attempt, widths)`: ratios that round to a network already tried reuse
  that attempt instead of fine-tuning it again.

Why the point estimate, not the interval's bound: it is the unbiased estimate of what a
variant loses, while the interval measures how few images there are. On the default split (270
val images, one image = 0.37 points) two equally good models that disagree on a handful of
images already have a 95 % interval wider than a 1-point budget (README, compress section), so
"the whole interval within budget" would reject models that lose nothing. The interval and the
count of disagreeing images are reported beside every verdict.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from torch import nn

from pipeline.config import Params
from pipeline.data import DeviceData
from pipeline.engine import EpochCallback, correct_per_image
from pipeline.pruning import count_macs_params, prune_and_finetune
from pipeline.stats import PairedDifference, paired_difference


@dataclass
class PruneAttempt:
    ratio: float
    val_accuracy: float  # the fine-tuned pruned model in PyTorch fp32 (no autocast)
    val_difference: PairedDifference  # vs the tuned model, evaluated the same way
    macs: int
    params: int
    within_budget: bool
    status: str  # "ok", or "diverged" when fine-tuning blew up
    finetune_seconds: float = 0.0
    same_widths_as: float | None = None  # an earlier ratio that gave the same network
    model: nn.Module | None = field(default=None, repr=False)

    def record(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        return out | {
            "val_accuracy": round(self.val_accuracy, 6),
            "val_difference": self.val_difference.record(),
        }


def judge(difference: PairedDifference, max_drop: float) -> tuple[bool, str]:
    """(accepted, why): the point estimate of the paired val difference to the tuned model may
    lose at most `max_drop` (the interval is reported beside it; see the module docstring)."""
    detail = f"val {difference.describe()} vs tuned"
    if difference.difference < -max_drop - 1e-9:
        return False, (
            f"loses {-100 * difference.difference:.2f} points ({detail}); "
            f"compress.max_accuracy_drop allows {100 * max_drop:.2f}"
        )
    return True, f"within budget ({detail}; max drop {100 * max_drop:.2f} points)"


def prune_attempt(
    tuned: nn.Module,
    data: DeviceData,
    params: Params,
    tuned_correct: np.ndarray,
    ratio: float,
    on_epoch: EpochCallback | None = None,
) -> PruneAttempt:
    """Prune and fine-tune a copy of `tuned` at `ratio`; compare it with the tuned model on val.

    `tuned_correct`: the tuned model's `correct_per_image` on val (same device, fp32, no autocast).
    """
    model = copy.deepcopy(tuned)
    torch.manual_seed(params.seed)
    fits = prune_and_finetune(
        model, data, ratio, params.compress, params.train, seed=params.seed, on_epoch=on_epoch
    )
    status = "ok" if all(f.status == "ok" for f in fits) else "diverged"
    correct = correct_per_image(model, data)
    difference = paired_difference(correct, tuned_correct)
    macs, n_params = count_macs_params(model.cpu(), data.x["train"][:1].cpu())
    within = judge(difference, params.compress.max_accuracy_drop)[0] and status == "ok"
    seconds = round(sum(f.train_seconds for f in fits), 3)
    accuracy = float(correct.mean())
    args = (ratio, accuracy, difference, macs, n_params, within, status, seconds)
    return PruneAttempt(*args, model=model)


def reuse_equal_widths(
    attempt: Callable[[float], PruneAttempt], widths: Callable[[float], str]
) -> Callable[[float], PruneAttempt]:
    """Wrap `attempt` so a ratio that gives already-tried widths reuses that attempt.

    With `round_to`, nearby ratios often give the same network (a 16-channel layer stays at 8
    for every ratio in (0.25, 0.5]); bisection would fine-tune it again for nothing.
    """
    tried: dict[str, PruneAttempt] = {}

    def cached(ratio: float) -> PruneAttempt:
        key = widths(ratio)
        if key in tried:
            first = tried[key]
            return dataclasses.replace(
                first, ratio=ratio, finetune_seconds=0.0, same_widths_as=first.ratio
            )
        tried[key] = attempt(ratio)
        return tried[key]

    return cached


def search_ratio(
    ratio: float, backoff_steps: int, attempt: Callable[[float], PruneAttempt]
) -> tuple[PruneAttempt, list[PruneAttempt]]:
    """Try `ratio`; if over budget, bisect between 0 and it. (kept attempt, every attempt).

    Keeps the largest ratio within budget; when none is, the most accurate attempt (on val).
    """
    tried = [attempt(ratio)]
    if tried[0].within_budget:
        return tried[0], tried
    low, high, best = 0.0, ratio, None
    for _ in range(backoff_steps):
        mid = round((low + high) / 2, 6)
        tried.append(attempt(mid))
        if tried[-1].within_budget:
            low, best = mid, tried[-1]
        else:
            high = mid
    if best is None:
        best = max(tried, key=lambda a: (a.val_accuracy, -a.ratio))
    return best, tried


def attempts_note(chosen: PruneAttempt, attempts: list[PruneAttempt]) -> str:
    tried = ", ".join(f"{a.ratio:g} -> val {a.val_accuracy:.4f}" for a in attempts)
    if not chosen.within_budget:
        return f"; no pruning ratio tried was within budget ({tried})"
    if len(attempts) > 1:
        return f"; backed off to ratio {chosen.ratio:g} ({tried})"
    return ""
