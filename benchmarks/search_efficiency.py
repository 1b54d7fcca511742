"""Search efficiency: does the model-based sampler matter, and how many epochs does pruning save?

Strategies, each through the pipeline's own study code (`pipeline.search_study.run_study`, sqlite
storage in a temp folder, MLflow off), same space, trial count and per-trial epoch budget:
- ours: TPE + successive halving (the default: one bracket, so TPE models every trial);
- random + successive halving: the same pruner, a random sampler (does TPE pay?);
- TPE + Hyperband (the previous default: TPE sees only its bracket's trials);
- random, no pruning: the classic baseline for epochs spent.

Tasks (both offline):
- `digits`: the default dataset (270 validation images; saturated: strategies differ by an
  image or two);
- `digits-150-wide`: the same images, but only 150 training images (15 per class), a
  narrower `cnn` (16-32) and the wide space a user unsure of the recipe would give (lr
  1e-4..10, weight decay 1e-6..0.1): configurations differ by tens of points, the best is
  far below 100 % and the good region is small, so a sampler's choices show. (With the
  default space, random search finds this task's plateau as often as TPE does.)

Two scores per study: its best trial's objective (val accuracy of the model that trial would
ship), and the test accuracy of that winner retrained as the search stage retrains it. The best
val accuracy is the maximum of noisy values, so it rises with the number of trials trained to
the end (random search without pruning completes all 24); the winner's test accuracy is held
out and has no such bias. Per task: the median and mean over seeds of both, and of epochs
spent. Verdicts, per task: TPE vs random under the same pruner (median best val accuracy);
ours vs random without pruning on both scores, and the ratio of epochs they spent.

    python benchmarks/search_efficiency.py [--quick] [--seeds 0 1 ...] [--tasks ...]
        [--strategies ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine, print_table  # noqa: E402

from pipeline.config import parse_params  # noqa: E402
from pipeline.data import DeviceData, prepare  # noqa: E402
from pipeline.search_study import run_study, summarize, trial_rows  # noqa: E402
from pipeline.train import train_and_evaluate  # noqa: E402

OURS = "ours: tpe + successive halving"
RANDOM_SAME_PRUNER = "random + successive halving"
RANDOM_NO_PRUNING = "random, no pruning"
STRATEGIES = {
    OURS: {"sampler": "tpe", "pruner": "successive_halving"},
    RANDOM_SAME_PRUNER: {"sampler": "random", "pruner": "successive_halving"},
    "tpe + hyperband rf 4 (old default)": {
        "sampler": "tpe",
        "pruner": "hyperband",
        "reduction_factor": 4,
    },
    RANDOM_NO_PRUNING: {"sampler": "random", "pruner": "none"},
}
HARD_TRAIN_IMAGES = 150
HARD_WIDTHS = [16, 32]


def digits_task(train_images: int | None) -> DeviceData:
    """Digits on the CPU; with `train_images`, a stratified subset of the training split."""
    data = DeviceData(prepare(parse_params({}).data, seed=0), torch.device("cpu"))
    if train_images:
        y = data.y["train"]
        per_class = train_images // data.num_classes
        keep = torch.cat([torch.nonzero(y == c)[:per_class, 0] for c in range(data.num_classes)])
        data.x["train"], data.y["train"] = data.x["train"][keep], y[keep]
    return data


HARD = f"digits-{HARD_TRAIN_IMAGES}-wide"
WIDE_SPACE = {"lr": [1e-4, 10.0], "weight_decay": [1e-6, 0.1]}
TASKS = {
    "digits": (lambda: digits_task(None), {}, {}),
    HARD: (lambda: digits_task(HARD_TRAIN_IMAGES), {"model": {"widths": HARD_WIDTHS}}, WIDE_SPACE),
}


def run_one(strategy: dict, task: tuple, seed: int, budget: tuple, folder: Path, data):
    overrides, space = task
    n_trials, epochs = budget
    db = folder / f"{seed}-{strategy['sampler']}-{strategy['pruner']}.db"
    db.unlink(missing_ok=True)
    params = parse_params(
        {
            "seed": seed,
            "device": "cpu",
            "tracking": {"enabled": False},
            **overrides,
            "search": {
                **strategy,
                "space": space,
                "n_trials": n_trials,
                "epochs": epochs,
                "storage": f"sqlite:///{db}",
            },
        }
    )
    start = time.perf_counter()
    study = run_study(params, data, "bench", None, progress=False)
    seconds = time.perf_counter() - start
    summary = summarize(params, study, trial_rows(study))
    # the winner retrained as the search stage does (its trial's recipe), scored on held-out
    # test images: unlike the best val accuracy, not inflated by how many trials completed
    winner_cfg = dataclasses.replace(params.train, **study.best_params, epochs=epochs)
    winner = train_and_evaluate(params, data, winner_cfg, description="winner")
    return {
        "seed": seed,
        "epochs spent": summary["epochs_spent"],
        "best val acc": summary["best_trial_val_accuracy"],
        "winner test acc": winner.metrics.get("test_accuracy", 0.0),
        "pruned": summary["n_pruned"],
        "seconds": seconds,
    }


def verdicts(task: str, stats: dict) -> None:
    """Per task: TPE vs random under the same pruner; ours vs random without pruning."""
    if (task, OURS) in stats and (task, RANDOM_SAME_PRUNER) in stats:
        tpe, rnd = stats[task, OURS], stats[task, RANDOM_SAME_PRUNER]
        verdict = "TPE better" if tpe["median"] > rnd["median"] else "TPE NOT better"
        print(
            f"{task}, same pruner: median best val accuracy TPE {tpe['median']:.4f} vs random "
            f"{rnd['median']:.4f} ({verdict}; means {tpe['mean']:.4f} vs {rnd['mean']:.4f})"
        )
    if (task, OURS) in stats and (task, RANDOM_NO_PRUNING) in stats:
        ours, baseline = stats[task, OURS], stats[task, RANDOM_NO_PRUNING]
        for key, name in [("median", "best val acc"), ("test median", "winner test acc")]:
            verdict = "equal or better" if ours[key] >= baseline[key] else "WORSE"
            print(
                f"{task}: median {name} ours {ours[key]:.4f}, random without pruning "
                f"{baseline[key]:.4f} ({verdict})"
            )
        print(
            f"{task}: epochs, random without pruning / ours: "
            f"{baseline['epochs'] / ours['epochs']:.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 trials x 6 epochs, 2 seeds")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(24)), metavar="SEED")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument(
        "--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES)
    )
    args = parser.parse_args()
    defaults = parse_params({}).search
    budget = (10, 6) if args.quick else (defaults.n_trials, defaults.epochs)
    seeds = args.seeds[:2] if args.quick else args.seeds
    torch.set_num_threads(torch.get_num_threads())
    rows, stats = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            make_data, *task_params = TASKS[task]
            data = make_data()
            for label in args.strategies:
                strategy = STRATEGIES[label]
                runs = [
                    run_one(strategy, task_params, seed, budget, Path(tmp), data) for seed in seeds
                ]
                rows += [{"task": task, "strategy": label, **r} for r in runs]
                accuracies = [r["best val acc"] for r in runs]
                tests = [r["winner test acc"] for r in runs]
                stats[task, label] = {
                    "epochs": statistics.median(r["epochs spent"] for r in runs),
                    "median": statistics.median(accuracies),
                    "mean": statistics.mean(accuracies),
                    "test median": statistics.median(tests),
                    "test mean": statistics.mean(tests),
                }
    print(f"machine: {machine()}")
    print(f"{budget[0]} trials x up to {budget[1]} epochs, seeds {' '.join(map(str, seeds))}")
    print_table(
        rows,
        [
            "task",
            "strategy",
            "seed",
            "epochs spent",
            "best val acc",
            "winner test acc",
            "pruned",
            "seconds",
        ],
    )
    summary = [
        {"task": task, "strategy": label, **{k: round(v, 4) for k, v in s.items()}}
        for (task, label), s in stats.items()
    ]
    print_table(
        summary, ["task", "strategy", "epochs", "median", "mean", "test median", "test mean"]
    )
    for task in args.tasks:
        verdicts(task, stats)


if __name__ == "__main__":
    main()
