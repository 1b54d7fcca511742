"""Pareto search: accuracy x measured latency, with and without early stopping, against MOASHA.

Task: the harder offline task of `search_efficiency.py` (digits with 150 training images, the
wide lr / weight-decay space a user unsure of the recipe gives), with the architecture in the
space too: `search.space.width: [0.25, 2.0]` on the default `cnn` (widths 32-64-128), so
latency varies 20x. Latency is measured once per architecture before any arm runs
(`pipeline.arch_cost.measure`: the ONNX model as the export stage writes it, ONNX Runtime CPU,
1 thread, batch `LATENCY_BATCH`) and the same table is given to every arm (our studies get it
in their cost cache, MOASHA through `cost_of`), so the arms differ only in what they search
and stop. Same space, trial count (24), epoch budget (12 per trial, rungs at 1, 2, 4, 8 with
eta 2) and seeds for all:

- ours: TPE (multi-objective) + our multi-objective successive halving (`pipeline.pareto`),
  through the search stage's own study code (`pipeline.search_study.run_study`);
- ours, NSGA-II: the same stopping rule with Optuna's NSGA-II sampler (which sampler to ship);
- (a) TPE without early stopping (the same sampler, every trial to 12 epochs);
- (b) random search without early stopping;
- (c) Syne Tune's MOASHA (`benchmarks/moasha.py`, its Python API, random configurations after
  the same first one as the studies: params.yaml's, which they enqueue), as released (0.16.0),
  and with its rank bug fixed (`corrected_ranks`); each is given the epochs ours spent on that
  seed (and at most 24 trials), so it is compared at equal epochs.

Score: the hypervolume of the Pareto front of each arm's complete trials (val accuracy, latency)
against one reference point for all (accuracy 0.1 = chance on 10 balanced classes, latency 1.1x
that of the widest architecture), as a function of the epochs spent ("anytime": the front of
the trials completed by then). For the study arms also the test hypervolume: the same trials
scored by their own models' accuracy on the held-out test split (kept by
`search_study.TrialTrainer`), which no arm selected on, so an arm that completes more trials
gains nothing from the maximum of more noisy val values. Verdicts: ours vs (a) on median
hypervolume and epochs (target: equal within noise, the 95 % interval of the mean paired
difference over seeds reaching 0 or above, at >= 2.5x fewer epochs; on val and on test);
ours vs MOASHA at equal epochs (target: at least its median).
Last line: `speedup: N.NNx` (median epochs of (a) / ours).

    python benchmarks/pareto_search.py [--seeds 0 1 2 3 4] [--arms ...] [--plot PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine, print_table  # noqa: E402
from search_efficiency import HARD_TRAIN_IMAGES, WIDE_SPACE, digits_task  # noqa: E402

from pipeline import arch_cost, pareto  # noqa: E402
from pipeline.checkpoint import arch_spec, build_model  # noqa: E402
from pipeline.config import WIDTH_STEP, parse_params  # noqa: E402
from pipeline.engine import fit  # noqa: E402
from pipeline.search_space import trial_params  # noqa: E402
from pipeline.search_study import TrialTrainer, run_study  # noqa: E402
from pipeline.study import load_study  # noqa: E402

N_TRIALS, EPOCHS, ETA = 24, 12, 2
WIDTH = (0.25, 2.0)
LATENCY_BATCH = 64
OURS, OURS_NSGA2 = "ours: tpe + MO halving", "ours, nsga2 + MO halving"
TPE_FULL, RANDOM_FULL = "(a) tpe, no stopping", "(b) random, no stopping"
MOASHA, MOASHA_FIXED = "(c) MOASHA 0.16.0", "(c) MOASHA, ranks fixed"
STUDY_ARMS = {
    OURS: {"sampler": "tpe", "pruner": "successive_halving"},
    OURS_NSGA2: {"sampler": "nsga2", "pruner": "successive_halving"},
    TPE_FULL: {"sampler": "tpe", "pruner": "none"},
    RANDOM_FULL: {"sampler": "random", "pruner": "none"},
}
MOASHA_ARMS = {MOASHA: False, MOASHA_FIXED: True}
ARMS = [*STUDY_ARMS, *MOASHA_ARMS]


def base_params(seed: int, folder: Path, arm: dict) -> dict:
    return {
        "seed": seed,
        "device": "cpu",
        "tracking": {"enabled": False},
        "search": {
            **arm,
            "n_trials": N_TRIALS,
            "epochs": EPOCHS,
            "reduction_factor": ETA,
            "objectives": ["accuracy", "latency"],
            "latency_batch": LATENCY_BATCH,
            "space": {**WIDE_SPACE, "width": list(WIDTH)},
            "storage": f"sqlite:///{folder / 'study.db'}",
        },
    }


def widths() -> list[float]:
    steps = round((WIDTH[1] - WIDTH[0]) / WIDTH_STEP)
    return [WIDTH[0] + i * WIDTH_STEP for i in range(steps + 1)]


def cost_table(params, info) -> dict[float, dict]:
    """width -> the measured cost of that architecture (once, shared by every arm)."""
    table = {}
    for w in widths():
        recipe = trial_params(
            params, {"lr": 0.1, "batch_size": 64, "weight_decay": 1e-4, "width": w}
        )
        table[w] = arch_cost.measure(arch_spec(recipe, info), params, info)
    return table


def hypervolume_curve(
    trials: list[dict], reference, accuracy: str = "accuracy"
) -> list[tuple[int, float]]:
    """(epochs spent so far, hypervolume of the complete trials so far) after each trial;
    `accuracy`: the trials' key to score them by (val `accuracy`, or `test_accuracy`)."""
    spent, done, curve = 0, [], []
    for t in trials:
        spent += t["epochs"]
        if t["complete"]:
            done.append((t[accuracy], t["latency"]))
        curve.append((spent, pareto.hypervolume(done, reference)))
    return curve


def test_hypervolume(trials: list[dict], reference) -> float | None:
    """The hypervolume of the complete trials scored by their models' held-out test accuracy:
    no selection on it, so no arm gains from taking the maximum of more noisy val values."""
    if any(t["complete"] and t.get("test_accuracy") is None for t in trials):
        return None
    return hypervolume_curve(trials, reference, "test_accuracy")[-1][1] if trials else 0.0


def at_epochs(curve: list[tuple[int, float]], epochs: int) -> float:
    """The hypervolume reached within `epochs` epochs (0 before the first complete trial)."""
    return max((hv for spent, hv in curve if spent <= epochs), default=0.0)


def run_study_arm(arm: dict, seed: int, data, table: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        params = parse_params(base_params(seed, Path(tmp), arm))
        study = load_study(params, "bench")
        for w, cost in table.items():  # the shared measurements, in the study's cost cache
            recipe = trial_params(params, {**_point(), "width": w})
            key = arch_cost.COST_ATTR + arch_cost.cost_key(arch_spec(recipe, data.info), params)
            study.set_user_attr(key, cost)
        trainer = TrialTrainer(params, data)  # keeps the complete trials' models
        study = run_study(params, data, "bench", None, progress=False, trainer=trainer)
        rows = []
        for t in sorted(study.trials, key=lambda t: t.number):
            if t.state.name not in ("COMPLETE", "PRUNED"):
                continue
            kept = trainer.outcome(trial_params(params, t.params)) if t.values else None
            rows.append(
                {
                    "epochs": t.user_attrs.get("epochs_run", 0),
                    "complete": t.state.name == "COMPLETE",
                    "accuracy": t.values[0] if t.values else None,
                    "test_accuracy": kept.metrics["test_accuracy"] if kept else None,
                    "latency": t.user_attrs.get("latency_ms"),
                }
            )
        return rows


def _point() -> dict:
    return {"lr": 0.1, "batch_size": 64, "weight_decay": 1e-4}


class _Stop(Exception):
    pass


def run_moasha_arm(corrected: bool, seed: int, data, table: dict, epoch_budget: int) -> list:
    from moasha import run_moasha

    params = parse_params(base_params(seed, Path("."), {}))
    space, train = params.search.space, params.train
    # the study arms' first trial is params.yaml's (enqueued); MOASHA starts from it too
    start = {"lr": train.lr, "batch_size": train.batch_size, "weight_decay": train.weight_decay}
    syne_space = {
        "lr": ("log", *space.lr),
        "batch_size": ("choice", list(space.batch_size)),
        "weight_decay": ("log", *space.weight_decay),
        "width": ("choice", widths()),
    }

    def evaluate(config, report):
        recipe = trial_params(params, config)
        torch.manual_seed(seed)
        model = build_model(arch_spec(recipe, data.info))

        def on_epoch(epoch, metrics):
            if not report(epoch, metrics["val_accuracy"]):
                raise _Stop

        try:
            fit(model, data, recipe.train, seed=seed, on_epoch=on_epoch, progress=False)
        except _Stop:
            pass

    records = run_moasha(
        syne_space,
        N_TRIALS,
        EPOCHS,
        1,
        ETA,
        seed,
        evaluate,
        lambda c: table[c["width"]]["latency_ms"],
        epoch_budget,
        corrected_ranks=corrected,
        first_config={**start, "width": 1.0},
    )
    return [
        {
            "epochs": r["epochs_run"],
            "complete": not r["stopped"],
            "accuracy": r["accuracy"],
            "latency": r["cost"],
        }
        for r in records
    ]


def paired_interval(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Mean of a - b over seeds and its 95 % interval (normal approximation)."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean = statistics.mean(diffs)
    half = 1.96 * statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("inf")
    return mean, mean - half, mean + half


def plot(curves: dict, path: Path, reference) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    grid = list(range(0, N_TRIALS * EPOCHS + 1, 4))
    lowest = []
    for arm, per_seed in curves.items():
        medians = [statistics.median(at_epochs(c, e) for c in per_seed) for e in grid]
        last = max(spent for c in per_seed for spent, _ in c)
        xs = [e for e in grid if e <= last]
        ax.plot(xs, medians[: len(xs)], label=arm)
        lowest.append(min(m for m in medians[: len(xs)] if m > 0))
    ax.set_ylim(bottom=0.97 * min(lowest))  # from the first complete trial: the gaps show
    ax.set_xlabel("epochs spent")
    ax.set_ylabel("hypervolume (median over seeds)")
    ax.set_title(
        f"accuracy x latency, digits-{HARD_TRAIN_IMAGES}-wide + width; reference "
        f"({reference[0]:g}, {reference[1]:.3g} ms)",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], metavar="SEED")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=ARMS)
    parser.add_argument("--plot", type=Path, default=None, help="hypervolume vs epochs PNG")
    parser.add_argument("--json", type=Path, default=None, help="write every curve here")
    parser.add_argument("--replot", type=Path, default=None, help="plot a --json file, no run")
    args = parser.parse_args()
    if args.replot:
        saved = json.loads(args.replot.read_text())
        plot(saved["curves"], args.plot, saved["reference"])
        return
    data = digits_task(HARD_TRAIN_IMAGES)
    params = parse_params(base_params(0, Path("."), {}))
    start = time.perf_counter()
    table = cost_table(params, data.info)
    print(f"measured {len(table)} architectures in {time.perf_counter() - start:.1f} s:")
    print("  " + ", ".join(f"w{w:g} {c['latency_ms']:.3f} ms" for w, c in table.items()))
    reference = (0.1, 1.1 * max(c["latency_ms"] for c in table.values()))
    curves: dict[str, list] = {arm: [] for arm in args.arms}
    rows = []
    for seed in args.seeds:
        ours_epochs = None
        for arm in [a for a in args.arms if a in STUDY_ARMS]:
            start = time.perf_counter()
            trials = run_study_arm(STUDY_ARMS[arm], seed, data, table)
            curves[arm].append(hypervolume_curve(trials, reference))
            rows.append(_row(arm, seed, trials, curves[arm][-1], start))
            rows[-1]["test hypervolume"] = test_hypervolume(trials, reference)
            if arm == OURS:
                ours_epochs = curves[arm][-1][-1][0]
        for arm in [a for a in args.arms if a in MOASHA_ARMS]:
            start = time.perf_counter()
            budget = ours_epochs or N_TRIALS * EPOCHS
            trials = run_moasha_arm(MOASHA_ARMS[arm], seed, data, table, budget)
            curves[arm].append(hypervolume_curve(trials, reference))
            rows.append(_row(arm, seed, trials, curves[arm][-1], start))
    print(f"machine: {machine()}")
    print(
        f"{N_TRIALS} trials x up to {EPOCHS} epochs (eta {ETA}), width {WIDTH[0]}..{WIDTH[1]}, "
        f"latency at batch {LATENCY_BATCH}, seeds {' '.join(map(str, args.seeds))}, "
        f"reference point ({reference[0]}, {reference[1]:.4f} ms)"
    )
    columns = ["arm", "seed", "trials", "complete", "epochs", "hypervolume", "test hypervolume"]
    print_table(rows, [*columns, "seconds"])
    summary = []
    for arm in args.arms:
        mine = [r for r in rows if r["arm"] == arm]
        tests = [r["test hypervolume"] for r in mine if r.get("test hypervolume") is not None]
        summary.append(
            {
                "arm": arm,
                "median epochs": statistics.median(r["epochs"] for r in mine),
                "median hypervolume": round(statistics.median(r["hypervolume"] for r in mine), 5),
                "mean hypervolume": round(statistics.mean(r["hypervolume"] for r in mine), 5),
                "median test hypervolume": round(statistics.median(tests), 5) if tests else None,
            }
        )
    print_table(summary, list(summary[0]))
    if args.json:
        args.json.write_text(json.dumps({"reference": reference, "curves": curves}))
    if args.plot:
        plot(curves, args.plot, reference)
    verdicts(args.arms, rows, curves)


def _row(arm, seed, trials, curve, start) -> dict:
    return {
        "arm": arm,
        "seed": seed,
        "trials": len(trials),
        "complete": sum(t["complete"] for t in trials),
        "epochs": curve[-1][0] if curve else 0,
        "hypervolume": round(curve[-1][1], 5) if curve else 0.0,
        "seconds": round(time.perf_counter() - start, 1),
    }


def verdicts(arms, rows, curves) -> None:
    def column(arm, key):
        return [r[key] for r in rows if r["arm"] == arm]

    if OURS not in arms:
        return
    ours_epochs = column(OURS, "epochs")
    for arm in [a for a in (OURS_NSGA2, TPE_FULL, RANDOM_FULL) if a in arms]:
        ratio = statistics.median(column(arm, "epochs")) / statistics.median(ours_epochs)
        for key, split in (("hypervolume", "val"), ("test hypervolume", "test")):
            mean, low, high = paired_interval(column(OURS, key), column(arm, key))
            verdict = "equal or better within noise" if high >= 0 else "WORSE beyond noise"
            print(
                f"ours vs {arm} ({split}): hypervolume ours - theirs {mean:+.5f} (95 % interval "
                f"{low:+.5f} ..{high:+.5f}: {verdict}); their epochs / ours {ratio:.2f}x"
            )
    for arm in [a for a in MOASHA_ARMS if a in arms]:
        equal = []
        for mine, theirs in zip(curves[OURS], curves[arm], strict=True):
            epochs = min(mine[-1][0], theirs[-1][0])
            equal.append((at_epochs(mine, epochs), at_epochs(theirs, epochs)))
        ours_median = statistics.median(m for m, _ in equal)
        theirs_median = statistics.median(t for _, t in equal)
        verdict = "at least MOASHA's" if ours_median >= theirs_median else "BELOW MOASHA's"
        mean, low, high = paired_interval([m for m, _ in equal], [t for _, t in equal])
        print(
            f"ours vs {arm} at equal epochs: median hypervolume {ours_median:.5f} vs "
            f"{theirs_median:.5f} ({verdict}; mean paired difference {mean:+.5f}, 95 % "
            f"interval {low:+.5f}..{high:+.5f})"
        )
    if TPE_FULL in arms:
        speedup = statistics.median(column(TPE_FULL, "epochs")) / statistics.median(ours_epochs)
        print(f"speedup: {speedup:.2f}x")


if __name__ == "__main__":
    main()
