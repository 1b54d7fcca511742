"""The Pareto search in a real (in-memory) Optuna study: config, space, cost cache, the rung
decisions the objective takes, the front, `search.select` and the hypervolume record."""

from __future__ import annotations

from types import SimpleNamespace

import optuna
import pytest
import torch
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from pipeline import arch_cost, pareto_study, study
from pipeline.checkpoint import arch_spec
from pipeline.config import parse_params
from pipeline.errors import ConfigError
from pipeline.search_space import current_point, scaled_model, trial_params

INFO = {"classes": list("0123456789"), "shape": [1, 8, 8], "mean": [0.3], "std": [0.2]}


def _params(select="max_accuracy", **search):
    return parse_params(
        {
            "device": "cpu",
            "train": {"lr": 0.05, "batch_size": 32, "weight_decay": 1e-3},
            "search": {
                "n_trials": 8,
                "epochs": 4,
                "objectives": ["accuracy", "latency"],
                "select": select,
                "space": {
                    "lr": [0.01, 0.1],
                    "batch_size": [32, 64],
                    "weight_decay": [1e-4, 1e-2],
                    "width": [0.25, 1.0],
                },
                **search,
            },
        }
    )


def _study():
    return optuna.create_study(directions=["maximize", "minimize"])


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("search", "message"),
    [
        ({"objectives": ["latency"]}, "search.objectives: got ['latency']"),
        ({"objectives": ["accuracy", "speed"]}, "one of latency, size, macs"),
        ({"select": {"latency_budget_ms": 1}}, "needs search.objectives [accuracy, latency]"),
        ({"select": {"min_accuracy": 0.9}}, "search.select.min_accuracy: needs a second"),
        ({"select": "fastest"}, "search.select: got 'fastest'; expected one of max_accuracy"),
        (
            {"objectives": ["accuracy", "latency"], "select": {"size_budget_mb": 1}},
            "needs search.objectives [accuracy, size]",
        ),
        (
            {
                "objectives": ["accuracy", "latency"],
                "select": {"latency_budget_ms": 1, "min_accuracy": 0.5},
            },
            "expected max_accuracy or exactly one of",
        ),
        ({"objectives": ["accuracy", "latency"], "pruner": "hyperband"}, "search.pruner"),
        ({"objectives": ["accuracy", "macs"], "sampler": "cmaes"}, "search.sampler: got 'cmaes'"),
        ({"space": {"width": [0.3, 1.0]}}, "multiples of 0.125"),
        ({"space": {"depth": [8, 14]}}, "search.space.depth: model.name 'cnn' has no depth"),
    ],
)
def test_bad_pareto_settings_name_the_key_and_what_is_allowed(search, message):
    with pytest.raises(ConfigError) as err:
        parse_params({"search": search})
    assert message in str(err.value)


def test_width_needs_a_model_with_widths():
    with pytest.raises(ConfigError, match="model.name 'lenet' has no width option"):
        parse_params({"model": {"name": "lenet"}, "search": {"space": {"width": [0.5, 1.0]}}})
    resnet = parse_params({"model": {"name": "resnet"}, "search": {"space": {"depth": [8, 20]}}})
    assert resnet.search.space.depth == (8, 20)


def test_a_pareto_study_has_its_own_name_and_two_directions(tmp_path):
    single = parse_params({"search": {"storage": f"sqlite:///{tmp_path}/s.db"}})
    pareto = parse_params(
        {"search": {"storage": f"sqlite:///{tmp_path}/s.db", "objectives": ["accuracy", "size"]}}
    )
    assert study.study_name(single, "sha") != study.study_name(pareto, "sha")
    # an unset width / depth leaves the name of an existing single-objective study alone
    assert (
        study.study_name(single, "sha")
        == "digits-cnn-" + study.study_name(single, "sha").rsplit("-", 1)[1]
    )
    # the batch the latency is timed at changes the objective: another study
    other_batch = parse_params(
        {"search": {"objectives": ["accuracy", "size"], "latency_batch": 8}}
    )
    assert study.study_name(other_batch, "sha") != study.study_name(pareto, "sha")
    s = study.load_study(pareto, "p")
    assert [d.name for d in s.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert isinstance(s.pruner, optuna.pruners.NopPruner)  # the rungs are ours
    assert isinstance(study.make_sampler(_params(sampler="nsga2")), optuna.samplers.NSGAIISampler)


# --- space ----------------------------------------------------------------------------------


def test_width_scales_widths_and_hidden_sizes_and_depth_replaces():
    model = parse_params({}).model
    half = scaled_model(model, 0.5, None)
    assert (half.widths, half.hidden, half.depth) == ((16, 32, 64), (128, 64), 8)
    tiny = scaled_model(model, 0.01, 20)
    assert (tiny.widths, tiny.hidden, tiny.depth) == ((1, 1, 1), (3, 1), 20)
    assert scaled_model(model, None, None) == model


def test_trial_params_is_the_whole_recipe_of_the_trial():
    params = _params()
    recipe = trial_params(
        params, {"lr": 0.02, "batch_size": 64, "weight_decay": 5e-3, "width": 0.75}
    )
    assert (recipe.train.lr, recipe.train.batch_size, recipe.train.weight_decay) == (
        0.02,
        64,
        5e-3,
    )
    assert recipe.train.epochs == params.search.epochs
    assert recipe.model.widths == (24, 48, 96)
    assert arch_spec(recipe, INFO)["options"]["widths"] == [24, 48, 96]


def test_suggest_draws_width_on_its_grid_and_depth_from_its_choices():
    params = parse_params(
        {"model": {"name": "resnet"}, "search": {"space": {"width": [0.5, 1.0], "depth": [8, 14]}}}
    )
    s = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    from pipeline.search_space import suggest

    drawn = [suggest(s.ask(), params) for _ in range(40)]
    assert {d["width"] for d in drawn} == {0.5, 0.625, 0.75, 0.875, 1.0}
    assert {d["depth"] for d in drawn} == {8, 14}
    assert s.trials[0].distributions["width"] == FloatDistribution(0.5, 1.0, step=0.125)


def test_params_yaml_point_includes_width_one_only_when_the_space_holds_it():
    assert current_point(_params()) == {
        "lr": 0.05,
        "batch_size": 32,
        "weight_decay": 1e-3,
        "width": 1.0,
    }
    narrow = _params(space={"lr": [0.01, 0.1], "width": [0.25, 0.75]})
    assert current_point(narrow) is None


# --- the cost cache -------------------------------------------------------------------------


def _cache(s, run_params, width, **cost):
    """Store a cost for the architecture of `width` in the study, as a worker would."""
    recipe = trial_params(
        run_params, {"lr": 0.05, "batch_size": 32, "weight_decay": 1e-3, "width": width}
    )
    record = {
        "latency_ms": 1.0,
        "latency_spread_ms": 0.01,
        "latency_batch": 1,
        "provider": "CPUExecutionProvider",
        "macs": 1000,
        "params": 100,
        "size_bytes": 4000,
        **cost,
    }
    key = arch_cost.COST_ATTR + arch_cost.cost_key(arch_spec(recipe, INFO), run_params)
    s.set_user_attr(key, record)
    return record


def test_study_cost_measures_an_architecture_once_and_then_reads_the_study(monkeypatch):
    params = _params()
    s = _study()
    arch = arch_spec(trial_params(params, {**current_point(params), "width": 0.25}), INFO)
    first = arch_cost.study_cost(s, arch, params, INFO)
    assert first["latency_ms"] > 0 and first["provider"] == "CPUExecutionProvider"
    assert first["macs"] > 0 and first["params"] > 0 and first["size_bytes"] > 1000
    wider = arch_spec(trial_params(params, {**current_point(params), "width": 1.0}), INFO)
    monkeypatch.setattr(arch_cost, "measure", lambda *a: pytest.fail("measured again"))
    assert arch_cost.study_cost(s, arch, params, INFO) == first
    with pytest.raises(pytest.fail.Exception):
        arch_cost.study_cost(s, wider, params, INFO)  # another architecture is measured


def test_a_cost_stored_by_another_worker_while_measuring_wins(monkeypatch):
    params = _params()
    s = _study()
    arch = arch_spec(trial_params(params, current_point(params)), INFO)
    theirs = {"latency_ms": 7.0}

    def measure_while_another_worker_stores(*args):
        s.set_user_attr(arch_cost.COST_ATTR + arch_cost.cost_key(arch, params), theirs)
        return {"latency_ms": 9.0}

    monkeypatch.setattr(arch_cost, "measure", measure_while_another_worker_stores)
    assert arch_cost.study_cost(s, arch, params, INFO) == theirs


def test_objective_values_are_in_the_units_of_their_budgets():
    cost = {"latency_ms": 0.25, "size_bytes": 2_500_000, "macs": 3_000_000}
    assert arch_cost.objective_value(cost, "latency") == 0.25
    assert arch_cost.objective_value(cost, "size") == pytest.approx(2.5)
    assert arch_cost.objective_value(cost, "macs") == pytest.approx(3.0)


# --- the rung decisions, through the objective ----------------------------------------------


def _data():
    return SimpleNamespace(device=torch.device("cpu"), info=INFO)


def _curve_trial(s, number_hint, curve, cost, state=TrialState.PRUNED, values=None):
    s.add_trial(
        create_trial(
            state=state,
            values=values,
            params={"lr": 0.05},
            distributions={"lr": FloatDistribution(0.01, 0.1, log=True)},
            user_attrs={pareto_study.CURVE_ATTR: curve, pareto_study.COST_ATTR: cost},
        )
    )


def _run_one(s, params, width, curve):
    """Run one trial of the real objective with a training function that reports `curve`."""

    def train_fn(recipe, on_epoch):
        for epoch, accuracy in enumerate(curve, start=1):
            on_epoch(epoch, {"train_loss": 1.0, "val_accuracy": accuracy})
        from pipeline.engine import FitResult

        return FitResult("ok", "", [{"train_loss": 1.0, "val_accuracy": a} for a in curve])

    s.enqueue_trial({"lr": 0.05, "batch_size": 32, "weight_decay": 1e-3, "width": width})
    objective = study.make_objective(params, _data(), None, train_fn)
    s.optimize(objective, n_trials=1)
    return s.trials[-1]


def test_a_trial_dominated_at_a_rung_stops_there_and_keeps_its_curve():
    params = _params()  # eta 2, rungs at epochs 1 and 2 of 4
    s = _study()
    _cache(s, params, 0.5, latency_ms=0.5)
    _curve_trial(s, 0, [0.9], 0.2)  # faster and more accurate at epoch 1
    _curve_trial(s, 1, [0.8], 0.3)
    t = _run_one(s, params, 0.5, [0.7, 0.8, 0.9, 0.95])
    assert t.state == TrialState.PRUNED
    assert t.user_attrs[pareto_study.CURVE_ATTR] == [0.7]  # stopped after epoch 1
    assert t.user_attrs["epochs_run"] == 1 and t.user_attrs["latency_ms"] == 0.5
    assert t.user_attrs[pareto_study.COST_ATTR] == 0.5


def test_a_trial_on_the_front_continues_and_completes_with_both_objectives():
    params = _params()
    s = _study()
    _cache(s, params, 0.25, latency_ms=0.1, macs=50)
    _curve_trial(s, 0, [0.9, 0.92], 0.5)
    _curve_trial(s, 1, [0.5, 0.52], 0.6)  # dominated, as is the next one: the front (0 and
    _curve_trial(s, 2, [0.4, 0.42], 0.7)  # the new trial) fills the top 4 // 2 at both rungs
    t = _run_one(s, params, 0.25, [0.6, 0.7, 0.8, 0.85])
    assert t.state == TrialState.COMPLETE and t.values == [0.85, 0.1]
    assert t.user_attrs[pareto_study.CURVE_ATTR] == [0.6, 0.7, 0.8, 0.85]
    assert t.user_attrs["macs"] == 50


def test_a_trial_on_the_front_continues_even_beyond_the_top_share():
    params = _params()
    s = _study()
    _cache(s, params, 0.25, latency_ms=0.1)
    _curve_trial(s, 0, [0.9, 0.92], 0.5)
    _curve_trial(s, 1, [0.5, 0.52], 0.6)
    # on the front with trial 0 (cheaper, less accurate): 3 // 2 = 1 is the top share, and the
    # earlier end of the front holds it, but a front trial goes on
    t = _run_one(s, params, 0.25, [0.6, 0.7, 0.8, 0.85])
    assert t.state == TrialState.COMPLETE and t.user_attrs["epochs_run"] == 4


def test_failed_trials_do_not_compete_and_a_retry_starts_a_new_curve():
    params = _params()
    s = _study()
    _cache(s, params, 0.5, latency_ms=0.5)
    # a dead worker's trial (FAIL) that was better: its retry will reach the rung again
    _curve_trial(s, 0, [0.99], 0.1, state=TrialState.FAIL)
    _curve_trial(s, 1, [0.5], 0.6)
    t = _run_one(s, params, 0.5, [0.7, 0.8, 0.9, 0.95])
    assert t.state == TrialState.COMPLETE  # beats the only competing trial at both rungs
    # with the FAIL trial counted it would have been stopped at epoch 1
    _curve_trial(s, 3, [0.99], 0.1, state=TrialState.PRUNED)
    _curve_trial(s, 4, [0.98], 0.1, state=TrialState.PRUNED)
    t2 = _run_one(s, params, 0.5, [0.7, 0.8, 0.9, 0.95])
    assert t2.state == TrialState.PRUNED and t2.user_attrs["epochs_run"] == 1


def test_a_retried_trial_starts_with_no_curve_and_the_cost_of_its_architecture():
    params = _params()
    s = _study()
    _cache(s, params, 0.75, latency_ms=0.3, macs=70, params=7)
    point = {"lr": 0.05, "batch_size": 32, "weight_decay": 1e-3, "width": 0.75}
    # a heartbeat retry copies the dead trial's attributes, its curve among them
    s.enqueue_trial(point, user_attrs={pareto_study.CURVE_ATTR: [0.99, 0.99]})
    trial = s.ask()
    from pipeline.search_space import suggest

    recipe = trial_params(params, suggest(trial, params))
    value, numbers = pareto_study.start_trial(trial, recipe, params, INFO)
    assert value == 0.3
    assert (numbers["objective_latency"], numbers["macs"], numbers["params"]) == (0.3, 70, 7)
    attrs = s.trials[-1].user_attrs
    assert attrs[pareto_study.CURVE_ATTR] == []  # competitors must not see the dead curve
    assert (attrs["latency_ms"], attrs["macs"], attrs["params"]) == (0.3, 70, 7)


def test_the_decision_depends_only_on_the_stored_points_not_their_order():
    params = _params(n_trials=20)
    points = [([0.9], 0.2), ([0.8], 0.1), ([0.85], 0.15), ([0.6], 0.05)]
    outcomes = []
    for order in (points, points[::-1]):
        s = _study()
        _cache(s, params, 0.5, latency_ms=0.12)
        for curve, cost in order:
            _curve_trial(s, 0, curve, cost)
        outcomes.append(_run_one(s, params, 0.5, [0.82, 0.9, 0.9, 0.9]).state)
    assert outcomes[0] == outcomes[1]


def test_a_rung_compares_every_trial_at_that_rung_epoch():
    params = _params()  # rungs at epochs 1 and 2
    s = _study()
    _cache(s, params, 0.5, latency_ms=0.5)
    # at epoch 1 the new trial (0.9 at 0.5 ms) is on the front (the most accurate); at epoch 2
    # both cheaper trials are more accurate too: dominated, outside the top 3 // 2, it stops
    _curve_trial(s, 0, [0.5, 0.95, 0.95, 0.95], 0.2)
    _curve_trial(s, 1, [0.4, 0.96, 0.96, 0.96], 0.2)
    t = _run_one(s, params, 0.5, [0.9, 0.9, 0.9, 0.9])
    assert t.state == TrialState.PRUNED and t.user_attrs["epochs_run"] == 2


def test_pruner_none_trains_every_trial_to_the_end():
    params = _params(pruner="none")
    s = _study()
    _cache(s, params, 0.5, latency_ms=0.5)
    _curve_trial(s, 0, [0.9], 0.2)
    _curve_trial(s, 1, [0.8], 0.3)
    t = _run_one(s, params, 0.5, [0.7, 0.8, 0.9, 0.95])
    assert t.state == TrialState.COMPLETE and t.values == [0.95, 0.5]


# --- front, select, hypervolume -------------------------------------------------------------


def _front_study():
    s = _study()
    for values in ([0.90, 1.0], [0.95, 2.0], [0.97, 4.0], [0.93, 3.0], [0.80, 0.5]):
        _curve_trial(s, 0, [values[0]], values[1], state=TrialState.COMPLETE, values=values)
    _curve_trial(s, 0, [0.99], 0.1, state=TrialState.PRUNED)  # never on the front
    return s


def test_front_holds_the_non_dominated_complete_trials_cheapest_first():
    s = _front_study()
    assert [t.number for t in pareto_study.front(s)] == [4, 0, 1, 2]  # 3 is dominated by 1


@pytest.mark.parametrize(
    ("select", "chosen"),
    [
        ("max_accuracy", 2),
        ({"latency_budget_ms": 2.0}, 1),  # the budget is inclusive
        ({"latency_budget_ms": 1.99}, 0),
        ({"min_accuracy": 0.92}, 1),  # the cheapest at or above the bar
        ({"min_accuracy": 0.8}, 4),
    ],
)
def test_select_picks_the_front_trial_the_rule_asks_for(select, chosen):
    assert pareto_study.select(_front_study(), _params(select=select)).number == chosen


def test_an_infeasible_budget_fails_in_one_line_with_the_best_reachable_value():
    s = _front_study()
    with pytest.raises(ConfigError) as err:
        pareto_study.select(s, _params(select={"latency_budget_ms": 0.2}))
    assert str(err.value) == (
        f"search.select.latency_budget_ms: got 0.2; no trial of study {s.study_name} fits: the "
        "cheapest measures 0.5 ms (trial 4, val accuracy 0.8000)"
    )
    with pytest.raises(ConfigError) as err:
        pareto_study.select(s, _params(select={"min_accuracy": 0.98}))
    assert "the most accurate has val accuracy 0.9700 (trial 2)" in str(err.value)


def test_hypervolume_record_uses_chance_and_the_largest_architecture_as_reference():
    params = _params()
    s = _front_study()
    _cache(s, params, 1.0, latency_ms=5.0)  # the widest architecture of the space
    record = pareto_study.hypervolume_record(s, params, INFO, chance=0.1)
    assert record["hypervolume_reference"] == [0.1, 5.5]
    # the staircase of the front (0.5, 0.8) (1, 0.9) (2, 0.95) (4, 0.97) up to (5.5, 0.1)
    expected = 0.5 * 0.7 + 1.0 * 0.8 + 2.0 * 0.85 + 1.5 * 0.87
    assert record["hypervolume"] == pytest.approx(expected, abs=1e-6)


def test_the_baseline_may_replace_the_winner_only_within_the_budget():
    params = _params(select={"latency_budget_ms": 1.0})
    s = _study()
    _cache(s, params, 1.0, latency_ms=2.0)
    baseline_arch = arch_spec(trial_params(params, current_point(params)), INFO)
    assert not pareto_study.baseline_fits(s, baseline_arch, params, INFO)
    assert pareto_study.baseline_fits(s, baseline_arch, _params(), INFO)  # max_accuracy
    loose = _params(select={"latency_budget_ms": 2.0})
    assert pareto_study.baseline_fits(s, baseline_arch, loose, INFO)
    fast = _study()
    _cache(fast, params, 1.0, latency_ms=0.01)  # under min_accuracy never, however fast
    assert not pareto_study.baseline_fits(
        fast, baseline_arch, _params(select={"min_accuracy": 0.5}), INFO
    )
