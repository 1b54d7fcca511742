"""The Pareto search in an Optuna study: accuracy x a measured cost, with early stopping.

`search.objectives: [accuracy, latency | size | macs]` makes the study two-objective (val
accuracy up, the architecture's cost down; `pipeline.arch_cost`). Optuna cannot prune such a
study (`Trial.report` raises), so the rung decisions are taken here, with the rule of
`pipeline.pareto` (successive halving over a non-dominated order):

- `start_trial`: the trial's architecture cost (from the study's cache, or measured) is recorded
  in its user attributes (`latency_ms`, `macs`, `params`, `size_bytes`, and `objective_cost`,
  the value minimised) before training, and its learning curve is reset (a heartbeat retry
  copies the dead trial's attributes).
- `should_stop`: after each epoch the val accuracies so far are stored in the trial's attribute
  `val_accuracy_by_epoch` (so they survive a crash and show in optuna-dashboard); at a rung
  epoch the trial goes on only when `pareto.continues`: it ranks in the top 1/eta, or lies on
  the Pareto front, of every COMPLETE, PRUNED or RUNNING trial that has reached that rung
  (failed ones are left out: their retry reaches the rung again). The decision reads only the
  study's storage, so it is the same for any worker, machine or resumed run. A stopped trial
  ends PRUNED.
- `front` / `select`: the Pareto front of the COMPLETE trials (a stopped trial's final accuracy is
  unknown); `search.select` picks the trial to ship: `max_accuracy`, the most
  accurate within a cost budget (`latency_budget_ms`, `size_budget_mb`, `macs_budget_m`), or
  the cheapest with val accuracy >= `min_accuracy`. An infeasible budget is a `ConfigError`
  naming the best reachable value.
- `hypervolume_record`: the front's hypervolume, with its reference point: accuracy = chance
  (the majority class's share of val), cost = 1.1 x the cost of the largest architecture of the
  space (so it does not move as trials are added).
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from pipeline import pareto
from pipeline.arch_cost import LABELS, SUFFIX, objective_value, study_cost
from pipeline.config import Params, SelectConfig
from pipeline.errors import ConfigError
from pipeline.search_space import TRAIN_KEYS, trial_params
from pipeline.stats import chance_level

CURVE_ATTR = "val_accuracy_by_epoch"
COST_ATTR = "objective_cost"
COST_KEYS = ("latency_ms", "latency_spread_ms", "macs", "params", "size_bytes")
REFERENCE_MARGIN = 1.1


def start_trial(
    trial: optuna.Trial, recipe: Params, params: Params, info: dict
) -> tuple[float, dict]:
    """Record the trial's cost attributes (see the module doc); return its objective value and
    the cost numbers for its MLflow run (`objective_<cost>`: the value minimised)."""
    from pipeline.checkpoint import arch_spec

    cost = study_cost(trial.study, arch_spec(recipe, info), params, info)
    value = objective_value(cost, params.search.cost)
    numbers = {key: cost[key] for key in COST_KEYS}
    for key, number in numbers.items():
        trial.set_user_attr(key, number)
    trial.set_user_attr(COST_ATTR, value)
    trial.set_user_attr(CURVE_ATTR, [])
    return value, {**numbers, f"objective_{params.search.cost}": value}


def rung_points(study, epoch: int, trial_number: int, own: pareto.Point) -> dict:
    """(accuracy at `epoch`, cost) of every trial that has reached rung `epoch` (see the module
    doc), this trial's own point included."""
    points = {}
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    for t in study.get_trials(deepcopy=False, states=states):
        curve = t.user_attrs.get(CURVE_ATTR) or []
        if t.number != trial_number and len(curve) >= epoch and COST_ATTR in t.user_attrs:
            points[t.number] = (curve[epoch - 1], t.user_attrs[COST_ATTR])
    points[trial_number] = own
    return points


def should_stop(trial: optuna.Trial, curve: list[float], cost: float, params: Params) -> bool:
    """Store the curve; True when the trial, at a rung epoch, is not promoted."""
    s = params.search
    stored = [round(float(a), 6) for a in curve]  # decide on what a replay would read
    trial.set_user_attr(CURVE_ATTR, stored)
    epoch = len(curve)
    if s.pruner == "none" or epoch not in pareto.rungs(s.min_epochs, s.epochs, s.reduction_factor):
        return False
    points = rung_points(trial.study, epoch, trial.number, (stored[-1], cost))
    return not pareto.continues(points, trial.number, s.reduction_factor)


def complete_points(study) -> dict[int, pareto.Point]:
    return {
        t.number: (t.values[0], t.values[1])
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    }


def front(study) -> list[FrozenTrial]:
    """The COMPLETE trials on the Pareto front, cheapest first."""
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    return [by_number[n] for n in pareto.pareto_front(complete_points(study))]


def _accuracy_first(t: FrozenTrial) -> tuple:
    """Sort key: the more accurate, then the cheaper, then the earlier trial is the larger."""
    return t.values[0], -t.values[1], -t.number


def select(study, params: Params) -> FrozenTrial:
    """The front trial `search.select` ships (see the module doc)."""
    candidates = front(study)
    rule = params.search.select
    most_accurate = max(candidates, key=_accuracy_first)
    if not isinstance(rule, SelectConfig):
        return most_accurate
    key, bound = rule.chosen()
    unit = SUFFIX[params.search.cost]
    if key == "min_accuracy":
        feasible = [t for t in candidates if t.values[0] >= bound]
        if not feasible:
            raise ConfigError(
                f"search.select.min_accuracy: got {bound:g}; no trial of study "
                f"{study.study_name} reaches it: the most accurate has val accuracy "
                f"{most_accurate.values[0]:.4f} (trial {most_accurate.number})"
            )
        return min(feasible, key=lambda t: (t.values[1], -t.values[0], t.number))
    feasible = [t for t in candidates if t.values[1] <= bound]
    if not feasible:
        cheapest = candidates[0]
        raise ConfigError(
            f"search.select.{key}: got {bound:g}; no trial of study {study.study_name} fits: the "
            f"cheapest measures {cheapest.values[1]:.6g} {unit} (trial {cheapest.number}, val "
            f"accuracy {cheapest.values[0]:.4f})"
        )
    return max(feasible, key=_accuracy_first)


def largest_recipe(params: Params) -> Params:
    """The space's largest architecture (widest, deepest), trained fields as params.yaml's."""
    space, train = params.search.space, params.train
    hp = {k: getattr(train, k) for k in TRAIN_KEYS}
    if space.width is not None:
        hp["width"] = max(space.width)
    if space.depth is not None:
        hp["depth"] = max(space.depth)
    return trial_params(params, hp)


def hypervolume_record(study, params: Params, info: dict, chance: float) -> dict:
    """The front's hypervolume and its reference point (see the module doc)."""
    from pipeline.checkpoint import arch_spec

    largest = study_cost(study, arch_spec(largest_recipe(params), info), params, info)
    reference = (chance, REFERENCE_MARGIN * objective_value(largest, params.search.cost))
    points = [(t.values[0], t.values[1]) for t in front(study)]
    return {
        "hypervolume": round(pareto.hypervolume(points, reference), 6),
        "hypervolume_reference": [round(reference[0], 6), round(reference[1], 6)],
    }


def pareto_rows(study, params: Params, selected: int | None) -> list[dict]:
    """studies/pareto.csv: one row per front trial."""
    from pipeline.search_space import architecture

    rows = []
    for t in front(study):
        rows.append(
            {
                "number": t.number,
                **{k: t.params.get(k) for k in ("lr", "batch_size", "weight_decay")},
                "width": t.params.get("width"),
                "depth": t.params.get("depth"),
                "architecture": architecture(t.params) or "params.yaml's",
                "val_accuracy": t.values[0],
                params.search.cost: t.values[1],
                **{k: t.user_attrs.get(k) for k in COST_KEYS},
                "selected": t.number == selected,
            }
        )
    return rows


def choose_trial(study, params: Params, val_labels, info: dict) -> tuple[FrozenTrial, dict]:
    """(the trial to ship, the Pareto record): the best trial of a single-objective study;
    `search.select` on the front of a Pareto study, with its hypervolume and front size."""
    if params.search.cost is None:
        return study.best_trial, {"selected_trial": None, "n_pareto": None, "hypervolume": None}
    chosen = select(study, params)
    chance = chance_level(val_labels.cpu())
    return chosen, {
        "selected_trial": chosen.number,
        f"selected_{params.search.cost}": chosen.values[1],
        "selected_val_accuracy": chosen.values[0],
        "n_pareto": len(front(study)),
        **hypervolume_record(study, params, info, chance),
        "select": _describe_select(params),
    }


def _describe_select(params: Params) -> str:
    rule = params.search.select
    if not isinstance(rule, SelectConfig):
        return rule
    key, bound = rule.chosen()
    return f"{key}: {bound:g}"


def baseline_fits(study, arch: dict, params: Params, info: dict) -> bool:
    """May the baseline (architecture `arch`) replace the winner? Always in a single-objective
    search or with `select: max_accuracy`; with a cost budget only when its architecture fits it;
    never with `min_accuracy` (the user asked for the cheapest model above a bar)."""
    rule = params.search.select
    if params.search.cost is None or not isinstance(rule, SelectConfig):
        return True
    key, bound = rule.chosen()
    if key == "min_accuracy":
        return False
    return objective_value(study_cost(study, arch, params, info), params.search.cost) <= bound


def figure(study, params: Params, selected: int | None):
    """plots/search_pareto.png's figure (`plots.pareto_figure`) of this study."""
    from pipeline.plots import pareto_figure

    cost = params.search.cost
    if cost is None:
        return pareto_figure(study.study_name, None, {}, [], [], selected)
    complete = complete_points(study)
    stopped = [
        (curve[-1], t.user_attrs[COST_ATTR])
        for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
        if (curve := t.user_attrs.get(CURVE_ATTR)) and COST_ATTR in t.user_attrs
    ]
    rule = params.search.select
    budget = dict([rule.chosen()]) if isinstance(rule, SelectConfig) else None
    title = f"accuracy x {cost}: {study.study_name}"
    return pareto_figure(
        title, LABELS[cost], complete, pareto.pareto_front(complete), stopped, selected, budget
    )
