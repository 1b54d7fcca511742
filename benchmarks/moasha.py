"""Syne Tune's MOASHA as a benchmark baseline: multi-objective early stopping, driven in-process.

MOASHA (multi-objective asynchronous successive halving; Schmucker et al. 2021, "Multi-objective
multi-fidelity hyperparameter optimization with application to fairness", and Salinas et al.
2021; implemented in Syne Tune as `syne_tune.optimizer.schedulers.multiobjective.MOASHA`) is
ASHA whose rung decisions rank trials on several objectives at once. Here: maximise the
validation accuracy, minimise the cost `cost_of(config)` (a measured latency in ms). Syne
Tune 0.16.0 takes one direction for all metrics (`do_minimize`), so the scheduler is given the
negated accuracy and the cost, both minimised.

How it is driven: no `Tuner`, no backend, no worker processes. `run_moasha` calls the
scheduler's own methods the way Syne Tune's `Tuner` does, one trial at a time:
`suggest()` -> `on_trial_add(Trial)` -> the caller's `evaluate(config, report)` trains epoch
by epoch and each `report(epoch, val_accuracy)` calls `on_trial_result`, whose
`SchedulerDecision` (CONTINUE or STOP) becomes `report`'s True/False. A STOP ends the trial for
good (`on_trial_remove`, as the `Tuner` does): MOASHA in 0.16.0 is a stopping scheduler only
(it has no `type` argument and never answers PAUSE), so nothing is paused or resumed. MOASHA
also returns STOP at `max_t`; such a trial ran to the end and is not counted as stopped.
Rungs: one bracket, `grace_period=min_epochs`, `reduction_factor=eta`, `max_t=max_epochs`, so
the rung levels are min_epochs * eta**k below max_epochs (1, 2, 4, 8 for 1/2/12), the same
levels as our successive halving. A trial reaching a rung continues when its 0-based position
p among the n trials recorded there (itself included; see the quirk below) has p / n <= 1 / eta:
the first floor(n / eta) + 1 go on, the first at a rung always, 2 of 2 at eta 2.
Ours (`pipeline/pareto.py`) keeps the first max(1, n // eta) and lets the first n < eta
continue only if best so far: from n = eta on, MOASHA lets one trial more go on.

Ordering: MOASHA's default, `NonDominatedPriority`: non-dominated sorting, and within a
Pareto front an eps-net (Salinas et al.: start from the best accuracy, then repeatedly the
point farthest, in Euclidean distance on the raw metric values, from those already taken).
Not NSGA-II. Ours: NSGA-II rank + crowding distance, the earlier trial winning ties. Both
arms get the same measured cost (our "estimated vs measured cost" distinction does not apply).

Known quirk of Syne Tune 0.16.0, kept by default: `NonDominatedPriority` returns the indices
in sorted order (best first) while the rung (`asha.Bracket.on_result`) reads the array as one
priority per trial, so the newcomer's "rank" is the position of whichever trial happens to
sort last; a newcomer that dominates every trial at its rung is stopped (seen with 5 and 6
trials at a rung, eta 2). `corrected_ranks=True` passes the inverse permutation (each
trial's position) instead.

Seeding: MOASHA draws configurations with numpy's global generator (it ignores its
`random_seed`); those draws run on a private `RandomState(seed)` swapped in around each
scheduler call, so a run is reproducible and `evaluate`'s own numpy draws are left alone.

Install (beside the venv, like OpenCV 4; nothing in `.venv` changes; no dependency of
syne-tune is needed: MOASHA's import chain uses only numpy, pandas and typing_extensions, all
in `.venv` already, not dill, statsmodels, scikit-learn, xgboost):

    .venv/bin/pip install --no-deps --target .venv/syne-tune syne-tune==0.16.0

Self-check (synthetic learning curves, no torch): `python benchmarks/moasha.py`.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

SYNE_TUNE_VERSION = "0.16.0"
# Where the install command above puts it: beside the running interpreter's venv.
SYNE_TUNE_DIR = Path(sys.prefix) / "syne-tune"
INSTALL_HINT = f"pip install --no-deps --target {SYNE_TUNE_DIR} syne-tune=={SYNE_TUNE_VERSION}"
TIME_ATTR = "epoch"
ACCURACY_METRIC = "neg_val_accuracy"  # minimised: -val_accuracy
COST_METRIC = "cost_ms"


def _syne_tune() -> Any:
    """Import Syne Tune (from SYNE_TUNE_DIR when present), or fail with the install command."""
    if SYNE_TUNE_DIR.is_dir() and str(SYNE_TUNE_DIR) not in sys.path:
        sys.path.insert(0, str(SYNE_TUNE_DIR))
    try:
        import syne_tune
        from syne_tune import config_space
        from syne_tune.backend.trial_status import Trial
        from syne_tune.optimizer.scheduler import SchedulerDecision
        from syne_tune.optimizer.schedulers.multiobjective import multiobjective_priority
        from syne_tune.optimizer.schedulers.multiobjective.moasha import MOASHA
    except ImportError as error:
        raise ImportError(f"Syne Tune is not installed ({error}): {INSTALL_HINT}") from error
    if syne_tune.__version__ != SYNE_TUNE_VERSION:
        raise ImportError(
            f"syne-tune {syne_tune.__version__} found, this adapter reads the "
            f"{SYNE_TUNE_VERSION} API: {INSTALL_HINT}"
        )
    return _Api(config_space, Trial, SchedulerDecision, multiobjective_priority, MOASHA)


class _Api:
    """The few Syne Tune names the adapter uses, imported once by `_syne_tune`."""

    def __init__(self, config_space, trial_cls, decision, priority, moasha_cls) -> None:
        self.config_space = config_space
        self.Trial = trial_cls
        self.SchedulerDecision = decision
        self.priority = priority
        self.MOASHA = moasha_cls


def to_syne_tune_space(space: dict, api: Any | None = None) -> dict:
    """Translate our space spec to Syne Tune domains.

    ("log", low, high) -> loguniform; ("choice", values) -> choice; ("step", low, high, step) ->
    finrange over low, low + step, ... up to high (ints when low, high and step are ints,
    as Optuna's `suggest_int(step=)`; a high off the grid is lowered onto it, as Optuna does).
    """
    cs = (api or _syne_tune()).config_space
    domains = {}
    for name, spec in space.items():
        kind, *args = spec
        if kind == "log":
            domains[name] = cs.loguniform(float(args[0]), float(args[1]))
        elif kind == "choice":
            domains[name] = cs.choice(list(args[0]))
        elif kind == "step":
            low, high, step = args
            size = math.floor((high - low) / step + 1e-9) + 1
            as_int = all(isinstance(v, int) for v in (low, high, step))
            domains[name] = cs.finrange(low, low + (size - 1) * step, size, cast_int=as_int)
        else:
            raise ValueError(f"space[{name!r}]: kind {kind!r}; allowed: log, choice, step")
    return domains


class _PrivateGlobalDraws:
    """Run code that draws from numpy's global generator on a private seeded state."""

    def __init__(self, seed: int) -> None:
        self._state = np.random.RandomState(seed).get_state()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        outer = np.random.get_state()
        np.random.set_state(self._state)
        try:
            yield
        finally:
            self._state = np.random.get_state()
            np.random.set_state(outer)


def _make_scheduler(api, space, max_epochs, min_epochs, reduction_factor, seed, corrected):
    priority = _corrected_priority(api)() if corrected else None  # None: MOASHA's default
    return api.MOASHA(
        config_space=to_syne_tune_space(space, api),
        metrics=[ACCURACY_METRIC, COST_METRIC],
        do_minimize=True,
        time_attr=TIME_ATTR,
        multiobjective_priority=priority,
        max_t=max_epochs,
        grace_period=min_epochs,
        reduction_factor=reduction_factor,
        brackets=1,
        random_seed=seed,
    )


def _corrected_priority(api: Any) -> type:
    class PositionPriority(api.priority.NonDominatedPriority):
        """NonDominatedPriority's order turned into one priority (position) per trial."""

        def priority_unsafe(self, objectives: np.ndarray) -> np.ndarray:
            return np.argsort(super().priority_unsafe(objectives))

    return PositionPriority


def _run_trial(
    api, scheduler, draws, trial_id, evaluate, cost_of, max_epochs, config=None
) -> dict:
    """Start one suggested trial (`config` instead of the suggestion, when given) and run it to
    its end; its record (config, curve, stopped)."""
    with draws.active():
        suggestion = scheduler.suggest()
        trial = api.Trial(
            trial_id=trial_id, config=config or suggestion.config, creation_time=datetime.now()
        )
        scheduler.on_trial_add(trial)
    config = dict(trial.config)
    cost = float(cost_of(config))
    curve: list[float] = []
    decisions: list[str] = []

    def report(epoch: int, val_accuracy: float) -> bool:
        if decisions and decisions[-1] == api.SchedulerDecision.STOP:
            raise RuntimeError(f"trial {trial_id}: report() called after it returned False")
        if epoch != len(curve) + 1:
            raise ValueError(
                f"trial {trial_id}: reported epoch {epoch}, expected {len(curve) + 1}"
            )
        curve.append(float(val_accuracy))
        result = {TIME_ATTR: epoch, ACCURACY_METRIC: -float(val_accuracy), COST_METRIC: cost}
        with draws.active():
            decisions.append(scheduler.on_trial_result(trial, result))
        return decisions[-1] != api.SchedulerDecision.STOP

    evaluate(config, report)
    if not curve:
        raise RuntimeError(f"trial {trial_id}: evaluate() returned without reporting an epoch")
    if decisions[-1] == api.SchedulerDecision.STOP:
        scheduler.on_trial_remove(trial)  # what Syne Tune's Tuner does after a STOP
    else:  # evaluate ended on its own before max_epochs
        last = {TIME_ATTR: len(curve), ACCURACY_METRIC: -curve[-1], COST_METRIC: cost}
        scheduler.on_trial_complete(trial, last)
    return {
        "config": config,
        "epochs_run": len(curve),
        "curve": curve,
        "stopped": len(curve) < max_epochs,
        "accuracy": curve[-1],
        "cost": cost,
    }


def run_moasha(
    space: dict,
    n_trials: int,
    max_epochs: int,
    min_epochs: int,
    reduction_factor: int,
    seed: int,
    evaluate: Callable[[dict, Callable[[int, float], bool]], None],
    cost_of: Callable[[dict], float],
    epoch_budget: int | None = None,
    *,
    corrected_ranks: bool = False,
    first_config: dict | None = None,
) -> list[dict]:
    """Run MOASHA sequentially (one worker) and return one record per trial, in start order.

    Args:
        space: name -> ("log", low, high) | ("choice", [values]) | ("step", low, high, step).
        n_trials: configurations to start at most.
        max_epochs: max resource per trial (MOASHA's `max_t`).
        min_epochs: min resource, the first rung (`grace_period`).
        reduction_factor: eta; 1 trial in eta goes on at each rung.
        seed: seeds the configuration draws.
        evaluate: `evaluate(config, report)` trains epoch by epoch, calls `report(epoch,
            val_accuracy)` after each (epoch = 1, 2, ...) and returns when it gets False.
        cost_of: the second objective of a config (ms, lower is better).
        epoch_budget: if given, no trial is started once the epochs run reach it (the trial
            running then finishes, so the total can pass it by up to max_epochs - 1).
        corrected_ranks: rank trials at a rung by their position in MOASHA's non-dominated
            order instead of Syne Tune 0.16.0's reading of it (see the module docstring).
        first_config: the first trial's configuration instead of a random draw (the same
            start as a study that enqueues the user's params.yaml trial).

    Returns:
        [{"config", "epochs_run", "curve" (accuracy per epoch), "stopped" (stopped before
        max_epochs), "accuracy" (last reported), "cost"}] in start order.
    """
    api = _syne_tune()
    scheduler = _make_scheduler(
        api, space, max_epochs, min_epochs, reduction_factor, seed, corrected_ranks
    )
    draws = _PrivateGlobalDraws(seed)
    trials: list[dict] = []
    epochs_run = 0
    while len(trials) < n_trials and (epoch_budget is None or epochs_run < epoch_budget):
        first = first_config if not trials else None
        record = _run_trial(
            api, scheduler, draws, len(trials), evaluate, cost_of, max_epochs, first
        )
        trials.append(record)
        epochs_run += record["epochs_run"]
    return trials


# --- self-check: synthetic learning curves --------------------------------------------------

SELF_CHECK_SPACE = {
    "lr": ("log", 1e-3, 1.0),
    "width": ("choice", [16, 32, 64]),
    "dropout": ("step", 0.0, 0.5, 0.1),
}
SELF_CHECK_COST_MS = {16: 1.0, 32: 2.0, 64: 4.0}


def synthetic_accuracy(config: dict, epoch: int) -> float:
    """(1 - exp(-epoch * rate)) * ceiling: lr near 0.1 learns fast, wide nets reach higher."""
    rate = 0.05 + 0.6 * math.exp(-((math.log10(config["lr"]) + 1.0) ** 2))
    ceiling = 0.6 + 0.05 * math.log2(config["width"]) - 0.3 * (config["dropout"] - 0.2) ** 2
    return (1.0 - math.exp(-epoch * rate)) * ceiling


def _synthetic_evaluate(config: dict, report: Callable[[int, float], bool]) -> None:
    for epoch in range(1, 13):
        if not report(epoch, synthetic_accuracy(config, epoch)):
            return


def self_check(n_trials: int = 16, max_epochs: int = 12, corrected_ranks: bool = False) -> int:
    """Run MOASHA on the synthetic objective, print each trial, assert it stopped some early."""
    trials = run_moasha(
        SELF_CHECK_SPACE, n_trials, max_epochs, 1, 2, 0, _synthetic_evaluate,
        lambda c: SELF_CHECK_COST_MS[c["width"]], corrected_ranks=corrected_ranks,
    )  # fmt: skip
    print(f"MOASHA, corrected_ranks={corrected_ranks}: {n_trials} trials, {max_epochs} epochs")
    print(f"{'#':>2} {'lr':>8} {'width':>5} {'drop':>4} {'acc@12':>6} {'epochs':>6} stopped")
    for i, t in enumerate(trials):
        c = t["config"]
        full = synthetic_accuracy(c, max_epochs)
        print(
            f"{i:>2} {c['lr']:>8.4f} {c['width']:>5} {c['dropout']:>4.1f} {full:>6.3f} "
            f"{t['epochs_run']:>6} {t['stopped']}"
        )
    total = sum(t["epochs_run"] for t in trials)
    print(f"total epochs {total} of {n_trials * max_epochs}")
    stopped = [t for t in trials if t["stopped"]]
    assert stopped, "MOASHA stopped no trial early"
    assert total < n_trials * max_epochs, total
    # The worst curves (bottom quarter of accuracy at max_epochs) do not all run to the end.
    worst = sorted(trials, key=lambda t: synthetic_accuracy(t["config"], max_epochs))
    assert any(t["stopped"] for t in worst[: n_trials // 4]), "no poor curve was stopped"
    return total


if __name__ == "__main__":
    self_check()
    self_check(corrected_ranks=True)
