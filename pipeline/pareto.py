"""Accuracy x cost Pareto helpers and the multi-objective successive-halving rule of the search.

Pure functions, no I/O, no torch/optuna: `pipeline/study.py` calls them with the values it has
recorded. A point is `(accuracy, cost)`: accuracy higher is better, cost (latency ms, size,
MACs) lower is better. Trials are identified by their Optuna trial number.

Why our own rule: Optuna cannot prune a multi-objective study, so a Pareto search would train
every trial to the end. We keep successive halving and replace "sort one value" by a
multi-objective order (MOASHA-like, but deterministic and run inside our Optuna study).

The rule
- Rungs (`rungs`): decisions are taken after `min_epochs * eta**k` epochs, k = 0, 1, ..., while
  below `max_epochs` (eta = reduction factor): (1, 12, 2) -> 1, 2, 4, 8; (1, 12, 3) -> 1, 3, 9.
  The same rungs as Optuna's `SuccessiveHalvingPruner(min_resource=min_epochs,
  reduction_factor=eta, min_early_stopping_rate=0)`.
- Decision (`continues`, what the search uses): a trial reaching a rung is compared with every
  trial that has reached that rung before it (asynchronous, like Optuna's): it continues when
  it is among the first `max(1, n // eta)` of `order(points)` over those n trials, itself
  included (`promoted`: Optuna's successive-halving top share with the multi-objective order),
  or when it is on the rung's Pareto front (rank 0). The front is kept because a trade-off no
  other trial covers cannot be judged by one share (measured: see `continues`).
- Order (`order`): by non-dominated rank (NSGA-II fronts: rank 0 = the points no other point
  dominates, rank 1 = the front of the rest, ...), then by crowding distance within the front
  (larger first: keep the spread of trade-offs, the ends of a front are always kept first), then
  by trial number (smaller first).
- Tie-break and duplicates: trials with identical points share a rank; the crowding distance is
  computed on the front's distinct points, and a later duplicate of a point gets 0 (it adds no
  spread; pymoo's `calc_crowding_distance` does the same), so of identical points the earliest
  trial always comes first.
- Deterministic: the order is a pure function of the set of (trial, point) pairs: points are
  processed in trial-number order whatever the insertion order of the mapping, and no random
  tie-break is drawn. Replaying the recorded points after a crash or a resume gives the same
  decisions.
- NaN: a point with a NaN accuracy (a diverged trial) or a NaN cost is replaced by the worst
  possible point (-inf, +inf): every point with real values dominates it, so a diverged trial
  never continues while any other trial competes at its rung, never sits on a Pareto front with
  real trials (`pareto_front` leaves it out altogether) and adds no hypervolume. (-inf accuracy
  alone would not do: with the lowest cost it would be non-dominated.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

Point = tuple[float, float]

WORST: Point = (-math.inf, math.inf)


def _clean(point: Point) -> Point:
    """The point as floats, NaN in either objective replaced by the worst point."""
    accuracy, cost = float(point[0]), float(point[1])
    if math.isnan(accuracy) or math.isnan(cost):
        return WORST
    return accuracy, cost


def _check_reduction_factor(reduction_factor: int) -> None:
    if reduction_factor < 2:
        raise ValueError(f"reduction_factor: got {reduction_factor}; expected an integer >= 2")


def _dominates(a: Point, b: Point) -> bool:
    """`dominates` for points already cleaned of NaN."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


def dominates(a: Point, b: Point) -> bool:
    """a is at least as good in both (acc >=, cost <=) and strictly better in one."""
    return _dominates(_clean(a), _clean(b))


def nondominated_ranks(points: Sequence[Point]) -> list[int]:
    """Non-dominated sorting (NSGA-II): rank 0 = the points no other point dominates, rank 1 =
    the front of the rest, ... Equal points share a rank.

    O(n log n) for two objectives: the points are swept by cost ascending (accuracy descending);
    a point's rank is the first front whose last point does not dominate it (that predicate is
    monotone over the fronts, so it is found by bisection).
    """
    cleaned = [_clean(p) for p in points]
    sweep = sorted(range(len(cleaned)), key=lambda i: (cleaned[i][1], -cleaned[i][0]))
    last_of_front: list[Point] = []  # the last (highest-accuracy) point swept into each front
    ranks = [0] * len(cleaned)
    for i in sweep:
        low, high = 0, len(last_of_front)
        while low < high:
            middle = (low + high) // 2
            if _dominates(last_of_front[middle], cleaned[i]):
                low = middle + 1
            else:
                high = middle
        ranks[i] = low
        if low == len(last_of_front):
            last_of_front.append(cleaned[i])
        else:
            last_of_front[low] = cleaned[i]
    return ranks


def _front_crowding(front: list[Point]) -> list[float]:
    """Crowding distances of the distinct points of one front (in the given order); with one
    or two points, both are ends: inf."""
    distances = [0.0] * len(front)
    for objective in (0, 1):
        by_value = sorted(range(len(front)), key=lambda j: front[j][objective])
        low, high = front[by_value[0]][objective], front[by_value[-1]][objective]
        distances[by_value[0]] = distances[by_value[-1]] = math.inf
        span = high - low
        if high == low or not math.isfinite(span):  # no scale to normalise by: adds nothing
            continue
        for position in range(1, len(by_value) - 1):
            previous, following = by_value[position - 1], by_value[position + 1]
            gap = front[following][objective] - front[previous][objective]
            distances[by_value[position]] += gap / span
    return distances


def crowding_distances(points: Sequence[Point], ranks: Sequence[int]) -> list[float]:
    """NSGA-II crowding distance within each rank: per objective, sort that front's points
    (stable, ties by index), the two ends get math.inf, inner points get the normalised gap
    (next - previous) / (max - min) of their neighbours, summed over both objectives; a front
    whose objective range is 0 (or infinite) adds 0 for that objective. A front of 1 or 2
    points: inf.

    Duplicates: the distances are computed on each front's distinct points; the first (lowest
    index) occurrence of a point gets that distance and every later copy gets 0.
    """
    if len(points) != len(ranks):
        raise ValueError(f"got {len(points)} points and {len(ranks)} ranks; expected as many")
    cleaned = [_clean(p) for p in points]
    distances = [0.0] * len(cleaned)
    members: dict[int, list[int]] = {}
    for i, rank in enumerate(ranks):
        members.setdefault(rank, []).append(i)
    for indices in members.values():
        if len(indices) <= 2:
            for i in indices:
                distances[i] = math.inf
            continue
        first_of: dict[Point, int] = {}
        for i in indices:
            first_of.setdefault(cleaned[i], i)
        distinct = list(first_of.values())  # by index: the first copy represents the point
        for i, distance in zip(
            distinct, _front_crowding([cleaned[i] for i in distinct]), strict=True
        ):
            distances[i] = distance
    return distances


def order(points: Mapping[int, Point]) -> list[int]:
    """Trial numbers from best to worst: by rank, then crowding distance (larger first), then
    trial number (smaller first: the earlier trial wins a tie, so the order is a pure function of
    the points)."""
    trials = sorted(points)
    values = [points[t] for t in trials]
    ranks = nondominated_ranks(values)
    distances = crowding_distances(values, ranks)
    best_first = sorted(range(len(trials)), key=lambda i: (ranks[i], -distances[i], trials[i]))
    return [trials[i] for i in best_first]


def promoted(points: Mapping[int, Point], trial: int, reduction_factor: int) -> bool:
    """The rung decision for `trial` (must be a key of `points`; `points` = every trial that has
    reached this rung so far, this one included): True when `trial` is among the first
    max(1, len(points) // reduction_factor) of `order(points)` (exactly the top-k rule of Optuna's
    SuccessiveHalvingPruner, with the multi-objective order instead of sorting one value).

    Raises:
        ValueError: `trial` is not in `points`, or `reduction_factor` < 2.
    """
    _check_reduction_factor(reduction_factor)
    if trial not in points:
        raise ValueError(
            f"trial {trial}: not among the {len(points)} trials of this rung; "
            "expected the points to include the trial being decided"
        )
    kept = max(1, len(points) // reduction_factor)
    return trial in order(points)[:kept]


def continues(points: Mapping[int, Point], trial: int, reduction_factor: int) -> bool:
    """The search's rung decision: `promoted` (the top max(1, n // eta) of `order`), or on the
    rung's Pareto front (rank 0: no trial at this rung is at least as good on both objectives
    and better on one). A non-dominated trial holds a trade-off no other trial at the rung
    covers; stopping it for a front larger than n // eta (on the order of the number of
    architectures) loses that part of the front: with the top share alone, the Pareto benchmark
    (`benchmarks/pareto_search.py`) spent 5.4x fewer epochs than training every trial but
    reached a smaller hypervolume beyond the noise; with the front kept, 2.8x fewer and the same
    within noise. Dominated trials still stop unless in the top share.

    Raises:
        ValueError: as `promoted`.
    """
    if promoted(points, trial, reduction_factor):
        return True
    trials = sorted(points)
    ranks = nondominated_ranks([points[t] for t in trials])
    return ranks[trials.index(trial)] == 0


def rungs(min_epochs: int, max_epochs: int, reduction_factor: int) -> list[int]:
    """The epochs at which decisions are taken: min_epochs * reduction_factor**k for k = 0, 1, ...
    while < max_epochs (the same rungs as Optuna's SuccessiveHalvingPruner with
    min_resource=min_epochs, min_early_stopping_rate=0: e.g. 1, 2, 4, 8 for (1, 12, 2);
    [] when min_epochs >= max_epochs).

    Raises:
        ValueError: `reduction_factor` < 2 or `min_epochs` < 1.
    """
    _check_reduction_factor(reduction_factor)
    if min_epochs < 1:
        raise ValueError(f"min_epochs: got {min_epochs}; expected an integer >= 1")
    epochs = []
    epoch = min_epochs
    while epoch < max_epochs:
        epochs.append(epoch)
        epoch *= reduction_factor
    return epochs


def pareto_front(points: Mapping[int, Point]) -> list[int]:
    """Trial numbers of the non-dominated points, sorted by cost ascending then accuracy
    descending then trial number. Of several trials with an identical point, all are kept.
    Trials with a NaN accuracy or cost are never on the front (not even when all are NaN)."""
    trials = [t for t in sorted(points) if _clean(points[t]) != WORST]
    values = [_clean(points[t]) for t in trials]
    ranks = nondominated_ranks(values)
    front = [(values[i][1], -values[i][0], trials[i]) for i in range(len(trials)) if ranks[i] == 0]
    return [trial for _, _, trial in sorted(front)]


def hypervolume(points: Iterable[Point], reference: Point) -> float:
    """2-D hypervolume: the area of the (accuracy, cost) region dominated by at least one point
    and dominating `reference` = (accuracy_ref, cost_ref), i.e. accuracy in (accuracy_ref, acc]
    and cost in [cost, cost_ref). Points not strictly better than the reference in both
    objectives add nothing. Empty -> 0.0.

    Raises:
        ValueError: the reference holds a NaN.
    """
    accuracy_ref, cost_ref = float(reference[0]), float(reference[1])
    if math.isnan(accuracy_ref) or math.isnan(cost_ref):
        raise ValueError(f"reference: got {reference}; expected two numbers")
    inside = sorted(
        (cost, accuracy)
        for accuracy, cost in map(_clean, points)
        if accuracy > accuracy_ref and cost < cost_ref
    )
    area = 0.0
    best_accuracy = accuracy_ref
    # sweep by cost: between two consecutive costs the height is the best accuracy reached so far
    next_costs = [cost for cost, _ in inside[1:]] + [cost_ref]
    for (cost, accuracy), next_cost in zip(inside, next_costs[: len(inside)], strict=True):
        best_accuracy = max(best_accuracy, accuracy)
        if next_cost != cost:  # equal costs: no width (and no inf - inf)
            area += (next_cost - cost) * (best_accuracy - accuracy_ref)
    return area
