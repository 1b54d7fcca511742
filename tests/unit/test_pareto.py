"""Pareto helpers and the multi-objective successive-halving rule: values computed by hand or by
a brute-force reference written here, and the rule run on synthetic learning curves."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable

import pytest

from pipeline import pareto
from pipeline.pareto import (
    crowding_distances,
    dominates,
    hypervolume,
    nondominated_ranks,
    order,
    pareto_front,
    promoted,
    rungs,
)

NAN = math.nan


# --- dominance and fronts --------------------------------------------------------------------


def test_equal_points_do_not_dominate_each_other():
    assert not dominates((0.9, 2.0), (0.9, 2.0))


@pytest.mark.parametrize(
    "better, worse",
    [
        ((0.9, 2.0), (0.9, 3.0)),  # equal accuracy, cheaper
        ((0.9, 2.0), (0.8, 2.0)),  # equal cost, more accurate
        ((0.9, 2.0), (0.8, 3.0)),  # better in both
    ],
)
def test_better_in_one_and_not_worse_in_the_other_dominates(better, worse):
    assert dominates(better, worse)
    assert not dominates(worse, better)


def test_a_trade_off_dominates_neither_way():
    assert not dominates((0.9, 3.0), (0.8, 2.0))
    assert not dominates((0.8, 2.0), (0.9, 3.0))


def test_nan_accuracy_or_cost_is_dominated_by_every_real_point():
    """Even the cheapest diverged trial is dominated: a NaN point is the worst point."""
    for diverged in [(NAN, 0.1), (NAN, NAN), (0.99, NAN)]:
        assert dominates((0.1, 100.0), diverged)
        assert not dominates(diverged, (0.1, 100.0))
    assert not dominates((NAN, 1.0), (NAN, 5.0))  # two diverged trials are equal


THREE_FRONTS = [
    ((0.9, 2.0), 0),
    ((0.85, 3.0), 1),  # dominated by (0.9, 2)
    ((0.6, 1.0), 0),
    ((0.8, 4.0), 2),  # dominated by (0.85, 3), itself in front 1
    ((0.95, 5.0), 0),
    ((0.5, 1.5), 1),  # dominated by (0.6, 1)
    ((0.6, 1.0), 0),  # a copy of a front-0 point
    ((0.4, 2.0), 2),  # dominated by (0.5, 1.5)
    ((0.9, 6.0), 1),  # dominated by (0.95, 5)
    ((0.8, 4.0), 2),  # a copy of a front-2 point
    ((NAN, 0.5), 3),  # diverged: behind everything, though the cheapest
]


def test_nondominated_ranks_of_three_fronts_with_copies():
    points = [p for p, _ in THREE_FRONTS]
    assert nondominated_ranks(points) == [rank for _, rank in THREE_FRONTS]
    assert nondominated_ranks([]) == []


def _peeled_ranks(points):
    """Reference: NSGA-II fronts by repeatedly peeling off the non-dominated rest (O(n^3))."""

    def dominated_by(i, j):
        (acc_i, cost_i), (acc_j, cost_j) = points[i], points[j]
        return acc_j >= acc_i and cost_j <= cost_i and (acc_j, cost_j) != (acc_i, cost_i)

    ranks = [None] * len(points)
    rank = 0
    while None in ranks:
        rest = [i for i, r in enumerate(ranks) if r is None]
        front = [i for i in rest if not any(dominated_by(i, j) for j in rest)]
        for i in front:
            ranks[i] = rank
        rank += 1
    return ranks


@pytest.mark.parametrize("seed", range(30))
def test_nondominated_ranks_match_peeling_on_random_points_with_ties(seed):
    rng = random.Random(seed)
    points = [(rng.randint(0, 5), rng.randint(0, 5)) for _ in range(rng.randint(1, 40))]
    assert nondominated_ranks(points) == _peeled_ranks(points)


# --- crowding distance and order --------------------------------------------------------------


def test_crowding_distance_of_a_front_by_hand():
    # one front of four points (given out of order) and a second front of one point
    points = [(4.0, 4.0), (1.0, 1.0), (5.0, 8.0), (2.0, 3.0), (1.5, 5.0)]
    ranks = nondominated_ranks(points)
    assert ranks == [0, 0, 0, 0, 1]
    distances = crowding_distances(points, ranks)
    # accuracy range 4, cost range 7: inner points get their neighbours' gaps
    assert distances[3] == pytest.approx((4 - 1) / 4 + (4 - 1) / 7)
    assert distances[0] == pytest.approx((5 - 2) / 4 + (8 - 3) / 7)
    assert distances[1] == distances[2] == distances[4] == math.inf  # the ends; a front of one


def test_fronts_of_one_or_two_points_are_infinitely_crowded():
    points = [(0.9, 3.0), (0.8, 2.0), (0.7, 4.0)]
    assert crowding_distances(points, [0, 0, 1]) == [math.inf] * 3
    # two distinct points and a copy: the distinct ones are the ends
    points = [(0.5, 1.0), (0.9, 3.0), (0.9, 3.0)]
    assert crowding_distances(points, [0, 0, 0]) == [math.inf, math.inf, 0.0]
    points = [(0.5, 1.0)] * 3
    assert crowding_distances(points, [0, 0, 0]) == [math.inf, 0.0, 0.0]


def test_an_infinite_objective_range_adds_nothing_for_that_objective():
    points = [(-math.inf, 0.5), (0.5, 1.0), (0.9, 3.0)]  # accuracy range is infinite
    distances = crowding_distances(points, nondominated_ranks(points))
    assert distances == [math.inf, pytest.approx((3.0 - 0.5) / 2.5), math.inf]


def test_a_later_copy_of_a_point_gets_zero_crowding():
    # the copies sit at the top end of the front, where index order would give the end to the
    # later copy: the distances are computed on distinct points, copies get 0
    points = [(0.5, 1.0), (0.9, 3.0), (0.7, 2.0), (0.9, 3.0), (0.9, 3.0)]
    distances = crowding_distances(points, nondominated_ranks(points))
    assert distances[:2] == [math.inf, math.inf]
    assert distances[2] == pytest.approx(2.0)  # (0.9 - 0.5) / 0.4 + (3 - 1) / 2
    assert distances[3:] == [0.0, 0.0]


def test_order_by_rank_then_crowding_then_trial_number():
    points = {
        10: (0.6, 4.0),  # front 1 alone
        3: (4.0, 4.0),  # front 0, inner, crowding 0.75 + 5/7
        7: (1.0, 1.0),  # front 0, end
        4: (5.0, 8.0),  # front 0, end
        2: (2.0, 3.0),  # front 0, inner, crowding 0.75 + 3/7
        1: (0.5, 5.0),  # front 2
    }
    assert order(points) == [4, 7, 3, 2, 10, 1]


@pytest.mark.parametrize("seed", range(20))
def test_order_does_not_depend_on_the_insertion_order(seed):
    rng = random.Random(seed)
    items = [(t, (rng.randint(0, 4) / 4, float(rng.randint(1, 5)))) for t in range(25)]
    items.append((25, (NAN, 0.0)))
    expected = order(dict(items))
    for _ in range(5):
        rng.shuffle(items)
        assert order(dict(items)) == expected
    assert sorted(expected) == list(range(26))
    assert expected[-1] == 25


# --- promoted and rungs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "min_epochs, max_epochs, eta, expected",
    [
        (1, 12, 2, [1, 2, 4, 8]),
        (1, 12, 3, [1, 3, 9]),
        (1, 8, 2, [1, 2, 4]),  # a rung at max_epochs would decide nothing
        (1, 9, 3, [1, 3]),
        (2, 20, 3, [2, 6, 18]),
        (1, 2, 2, [1]),
        (3, 3, 2, []),
        (5, 3, 2, []),
    ],
)
def test_rungs(min_epochs, max_epochs, eta, expected):
    assert rungs(min_epochs, max_epochs, eta) == expected


@pytest.mark.parametrize("eta", [1, 0, -2])
def test_a_reduction_factor_below_2_is_refused(eta):
    with pytest.raises(ValueError, match=rf"reduction_factor: got {eta}"):
        rungs(1, 12, eta)
    with pytest.raises(ValueError, match=rf"reduction_factor: got {eta}"):
        promoted({0: (0.5, 1.0)}, 0, eta)


def test_min_epochs_below_1_is_refused():
    with pytest.raises(ValueError, match="min_epochs: got 0"):
        rungs(0, 12, 2)


def test_deciding_a_trial_absent_from_the_rung_is_refused():
    with pytest.raises(ValueError, match="trial 7: not among the 2 trials"):
        promoted({0: (0.5, 1.0), 1: (0.6, 2.0)}, 7, 2)


def test_the_first_floor_n_over_eta_of_the_order_are_promoted():
    # a single objective in disguise (equal costs): the order is by accuracy
    points = {t: (acc, 1.0) for t, acc in enumerate([0.5, 0.9, 0.7, 0.6, 0.8])}
    assert order(points) == [1, 4, 2, 3, 0]
    assert [promoted(points, t, 2) for t in range(5)] == [False, True, False, False, True]
    assert [promoted(points, t, 3) for t in range(5)] == [False, True, False, False, False]
    assert [promoted(points, t, 6) for t in range(5)] == [False, True, False, False, False]
    assert promoted({3: (0.1, 9.0)}, 3, 2)  # alone at its rung


# --- the rule on synthetic learning curves -------------------------------------------------------

Curve = Callable[[int], float]  # accuracy after `epoch` epochs


def simulate(trials, min_epochs, max_epochs, eta, history=None):
    """One worker, trials run one after the other (asynchronous successive halving): a trial
    trains epoch by epoch; at each rung it records its point and stops unless promoted among
    the trials that reached that rung before it.

    trials: {trial number: (cost, curve)}, run in that order. history: {rung: {trial: point}}
    recorded so far (resumed from), updated in place.
    Returns ({trial: epochs trained}, {(rung, trial): decision}, history)."""
    history = {} if history is None else history
    trained, decisions = {}, {}
    for trial, (cost, curve) in trials.items():
        trained[trial] = max_epochs
        for rung in rungs(min_epochs, max_epochs, eta):
            at_rung = history.setdefault(rung, {})
            at_rung[trial] = (curve(rung), cost)
            decisions[rung, trial] = promoted(at_rung, trial, eta)
            if not decisions[rung, trial]:
                trained[trial] = rung
                break
    return trained, decisions, history


def _shifted(final: float) -> Curve:
    """All trials learn alike: accuracy `final` minus 0.4 / epoch."""
    return lambda epoch: final - 0.4 / epoch


# (cost, final accuracy): at every rung the points keep the same dominance relations and the
# same crowding distances (normalised gaps do not see the shift), so the run is worked by hand
# below with the final accuracies.
EIGHT = {
    0: (5.0, 0.70),
    1: (4.0, 0.80),  # dominates 0
    2: (1.0, 0.60),
    3: (8.0, 0.90),
    4: (6.0, 0.65),  # dominated by 0 and 1
    5: (2.0, 0.85),  # dominates 0, 1, 4
    6: (0.5, 0.50),
    7: (3.0, 0.95),  # dominates 0, 1, 3, 4
}


def _eight_trials():
    return {t: (cost, _shifted(final)) for t, (cost, final) in EIGHT.items()}


def test_eight_trials_with_eta_2_reach_the_last_rung_as_worked_by_hand():
    """rungs(1, 8, 2) = [1, 2, 4]. Rung 1 (k = max(1, n // 2)):
    t0 alone: kept. t1 dominates 0: kept. t2: front {1, 2} (both ends, inf), k = 1, trial 1
    wins the tie: stops. t3: front {1, 2, 3}, 2 and 3 are the ends, k = 2: kept. t4: dominated
    by 0 and 1 (k = 2): stops. t5: front {2, 5, 3} ends 2, 3, then 5, k = 3: kept. t6: front
    {6, 2, 5, 3}, ends 3, 6, then 5 (0.75 + 0.93) before 2 (0.875 + 0.2), k = 3: kept.
    t7: front {6, 2, 5, 7}, ends 6, 7, k = 4: kept.
    Rung 2 (0, 1, 3, 5, 6, 7 arrive): t0, t1 kept as at rung 1. t3: front {1, 3}, k = 1, trial 1
    wins the tie: stops. t5: front {3, 5}, k = 2: kept. t6: front {3, 5, 6}, ends 3 and 6, k = 2:
    kept. t7: front {6, 5, 7}, ends 6 and 7, k = 3: kept.
    Rung 4 (0, 1, 5, 6, 7 arrive): 0, 1 kept; t5 dominates 0 and 1, k = 1: kept. t6: front
    {5, 6}, k = 2: kept. t7: front {6, 5, 7}, ends 6 and 7, k = 2: kept."""
    trained, decisions, _ = simulate(_eight_trials(), 1, 8, 2)
    assert trained == {0: 8, 1: 8, 2: 1, 3: 2, 4: 1, 5: 8, 6: 8, 7: 8}
    assert [t for t in EIGHT if decisions.get((4, t))] == [0, 1, 5, 6, 7]


def _random_trials(rng, n, nan_share=0.0):
    trials = {}
    for t in range(n):
        cost = float(rng.randint(1, 6))
        final, speed = rng.choice([0.5, 0.6, 0.7, 0.8, 0.9]), rng.choice([0.1, 0.3, 0.5])
        if rng.random() < nan_share:
            trials[t] = (cost, lambda epoch: NAN)
        else:  # rounded: ties between trials happen
            trials[t] = (cost, lambda epoch, f=final, s=speed: round(f - s / epoch, 2))
    return trials


@pytest.mark.parametrize("eta", [2, 3])
def test_a_trial_dominated_by_k_others_at_a_rung_stops_there(eta):
    rng = random.Random(eta)
    checked = 0
    for _ in range(20):
        _, decisions, history = simulate(_random_trials(rng, 30, 0.1), 1, 27, eta)
        for (rung, trial), decision in decisions.items():
            at_rung = {s: p for s, p in history[rung].items() if s <= trial}
            dominating = sum(dominates(p, at_rung[trial]) for p in at_rung.values())
            if dominating >= max(1, len(at_rung) // eta):
                assert not decision, (rung, trial, at_rung)
                checked += 1
    assert checked > 100


def test_a_trial_dominated_by_k_others_stops_and_by_fewer_may_continue():
    points = {0: (0.8, 2.0), 1: (0.9, 2.5), 5: (0.7, 3.0)}  # 5: dominated by 0 and 1
    points |= {2: (0.6, 4.0), 3: (0.5, 5.0), 4: (0.65, 3.5)}  # each dominated by 5
    assert promoted(points, 5, 2)  # 2 dominators, k = 3
    points[6] = (0.75, 2.8)  # a third dominator of 5 (itself dominated by 0)
    assert order(points)[:4] == [0, 1, 6, 5]
    assert not promoted(points, 5, 2)  # 3 dominators, k = max(1, 7 // 2) = 3


@pytest.mark.parametrize("eta", [2, 3])
def test_trials_on_the_front_continue_when_the_front_fits_in_the_top_share(eta):
    rng = random.Random(10 + eta)
    checked = 0
    for _ in range(20):
        _, decisions, history = simulate(_random_trials(rng, 30, 0.1), 1, 27, eta)
        for (rung, trial), decision in decisions.items():
            at_rung = {s: p for s, p in history[rung].items() if s <= trial}
            front = pareto_front(at_rung)
            if trial in front and len(front) <= max(1, len(at_rung) // eta):
                assert decision, (rung, trial, at_rung)
                checked += 1
    assert checked > 100


def test_a_late_cheap_trade_off_continues_over_older_dominated_trials():
    # trials 0-3 are dominated by trial 4 or 5; 4 and 5 are the front and fit in k = 3
    points = {0: (0.6, 5.0), 1: (0.7, 6.0), 2: (0.5, 4.0), 3: (0.65, 7.0)}
    points |= {4: (0.8, 3.0), 5: (0.55, 1.0)}
    assert promoted(points, 4, 2) and promoted(points, 5, 2)
    assert order(points)[:2] == [4, 5]


@pytest.mark.parametrize("first, second", [(0, 1), (3, 8)])
def test_of_two_identical_points_the_earlier_trial_wins(first, second):
    point = (0.75, 2.5)
    for points in ({first: point, second: point}, {second: point, first: point}):
        assert promoted(points, first, 2)
        assert not promoted(points, second, 2)
    # the copies at the expensive end of a front of three distinct points, k = 3 of 6
    points = {second: (0.9, 3.0), 20: (0.5, 1.0), 21: (0.7, 2.0), first: (0.9, 3.0)}
    points |= {22: (0.4, 4.0), 23: (0.3, 5.0)}
    assert order(points)[:4] == [first, 20, 21, second]
    assert promoted(points, first, 2) and not promoted(points, second, 2)


def test_a_simulated_tie_keeps_the_earlier_trial():
    same = _shifted(0.8)
    trained, _, _ = simulate({0: (2.0, same), 1: (2.0, same)}, 1, 4, 2)
    assert trained == {0: 4, 1: 1}


@pytest.mark.parametrize("seed", range(5))
def test_replaying_the_recorded_points_gives_the_same_decisions(seed):
    rng = random.Random(100 + seed)
    trials = _random_trials(rng, 40, 0.1)
    trained, decisions, history = simulate(trials, 1, 12, 2)
    # the recorded points, reloaded in another order: each decision recomputed from the trials
    # that had reached the rung before it
    for (rung, trial), decision in decisions.items():
        recorded = list(history[rung].items())
        rng.shuffle(recorded)
        assert promoted({s: p for s, p in recorded if s <= trial}, trial, 2) == decision
    # a crash after trial 19: resume from the recorded points only, reloaded in reverse
    first = dict(itertools.islice(trials.items(), 20))
    rest = {t: c for t, c in trials.items() if t >= 20}
    trained_before, decisions_before, recorded = simulate(first, 1, 12, 2)
    reloaded = {rung: dict(reversed(list(points.items()))) for rung, points in recorded.items()}
    trained_after, decisions_after, _ = simulate(rest, 1, 12, 2, history=reloaded)
    assert trained_before | trained_after == trained
    assert decisions_before | decisions_after == decisions
    assert len(set(trained.values())) > 1  # trials stopped at different rungs


@pytest.mark.parametrize("eta", [2, 3, 4])
def test_a_nan_accuracy_trial_never_continues_against_eta_competitors(eta):
    rng = random.Random(eta)
    for n_competitors in range(eta, 3 * eta + 1):
        points = {t: (rng.uniform(0.1, 0.9), rng.uniform(1.0, 9.0)) for t in range(n_competitors)}
        for diverged in [(NAN, 0.01), (NAN, 100.0), (0.99, NAN)]:  # cheapest or not
            for trial in (-1, n_competitors):  # the earliest or the latest trial
                assert not promoted({**points, trial: diverged}, trial, eta)
    # in a run: a trial that diverges after its first rung stops at the second
    diverging = (0.5, lambda epoch: 0.99 if epoch < 2 else NAN)  # the cheapest, best at rung 1
    trials = {0: (2.0, _shifted(0.7)), 1: (1.5, _shifted(0.8)), 2: diverging}
    trained, _, _ = simulate(trials, 1, 8, eta=2)
    assert trained == {0: 8, 1: 8, 2: 2}


# --- Pareto front and hypervolume ------------------------------------------------------------


def test_pareto_front_keeps_copies_and_sorts_by_cost():
    points = {
        4: (0.9, 3.0),
        1: (0.9, 3.0),  # a copy of 4
        2: (0.7, 1.0),
        3: (0.8, 3.5),  # dominated by 4
        0: (0.95, 7.0),
        5: (0.7, 1.0),  # a copy of 2
        6: (NAN, 0.1),  # diverged: never on the front
        7: (0.6, 1.0),  # dominated by 2 (same cost)
    }
    assert pareto_front(points) == [2, 5, 1, 4, 0]
    assert pareto_front({}) == []
    assert pareto_front({0: (NAN, 1.0), 1: (NAN, 2.0)}) == []


def test_hypervolume_of_one_point_is_its_rectangle():
    assert hypervolume([(0.9, 2.0)], (0.5, 10.0)) == pytest.approx(0.4 * 8.0)


def test_hypervolume_of_a_staircase_by_hand():
    # cost [1, 4) up to accuracy 3, cost [4, 10) up to accuracy 5
    assert hypervolume([(3.0, 1.0), (5.0, 4.0)], (0.0, 10.0)) == 3 * 3 + 6 * 5


def test_dominated_or_outside_points_add_no_hypervolume():
    front = [(3.0, 1.0), (5.0, 4.0)]
    extra = [
        (2.0, 2.0),  # dominated
        (3.0, 1.0),  # a copy
        (0.0, 0.5),  # accuracy at the reference: not strictly better
        (-1.0, 0.5),  # worse than the reference
        (9.0, 10.0),  # cost at the reference
        (9.0, 12.0),  # cost beyond
        (NAN, 0.5),  # diverged
        (9.0, NAN),
    ]
    assert hypervolume(front + extra, (0.0, 10.0)) == hypervolume(front, (0.0, 10.0)) == 39.0
    assert hypervolume([], (0.0, 10.0)) == 0.0
    assert hypervolume(extra[2:], (0.0, 10.0)) == 0.0


def test_hypervolume_refuses_a_nan_reference():
    with pytest.raises(ValueError, match="reference"):
        hypervolume([(0.9, 1.0)], (NAN, 10.0))


def _grid_hypervolume(points, reference):
    """Reference for integer points: count the unit cells dominated by some point and
    dominating the reference."""
    accuracy_ref, cost_ref = reference
    cells = 0
    for a in range(accuracy_ref, max(p[0] for p in points) + 1):
        for c in range(min(p[1] for p in points), cost_ref):
            # the cell [a, a + 1] x [c, c + 1]
            cells += any(a + 1 <= acc and cost <= c for acc, cost in points)
    return cells


@pytest.mark.parametrize("seed", range(30))
def test_hypervolume_matches_a_grid_count(seed):
    rng = random.Random(seed)
    points = [(rng.randint(-2, 8), rng.randint(0, 12)) for _ in range(rng.randint(1, 15))]
    reference = (0, 10)
    assert hypervolume(points, reference) == _grid_hypervolume(points, reference)
    # the same area whatever the order of the points
    assert hypervolume(reversed(points), reference) == hypervolume(points, reference)


# --- continues: the top share, or the rung's front -------------------------------------------


def test_continues_keeps_every_front_trial_and_the_top_share_only_of_the_rest():
    points = {
        0: (0.90, 1.0),  # front
        1: (0.95, 2.0),  # front
        2: (0.97, 4.0),  # front
        3: (0.80, 3.0),  # dominated by 0 and 1
        4: (0.85, 5.0),  # dominated
        5: (0.70, 0.5),  # front (cheapest)
    }
    # 6 // 2 = 3 is the top share: the order puts the front's ends (5, 2) and one inner point first
    top = set(pareto.order(points)[:3])
    assert top < {0, 1, 2, 5}
    assert {t for t in points if pareto.continues(points, t, 2)} == {0, 1, 2, 5}
    assert {t for t in points if pareto.promoted(points, t, 2)} == top


def test_continues_stops_a_dominated_trial_once_the_rung_has_eta_trials():
    assert pareto.continues({0: (0.9, 1.0)}, 0, 2)  # alone: the top share
    assert not pareto.continues({0: (0.9, 1.0), 1: (0.8, 2.0)}, 1, 2)
    assert not pareto.continues({0: (0.9, 1.0), 1: (float("nan"), 0.1)}, 1, 2)
    assert pareto.continues({0: (0.9, 1.0), 1: (0.8, 0.5)}, 1, 2)  # cheaper: on the front
    with pytest.raises(ValueError, match="trial 7"):
        pareto.continues({0: (0.9, 1.0)}, 7, 2)
