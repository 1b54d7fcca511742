"""Search efficiency: our default search (TPE + Hyperband) against random search without pruning.

Same number of trials, same per-trial epoch budget, same space, 3 seeds, on digits; both run
through the pipeline's own study code (`pipeline.search.run_study`, sqlite storage in a temp
folder, MLflow off). For each: epochs trained in total and the best val accuracy. The last line
is the ratio of median epochs spent (random / ours); it counts only when our median best
accuracy is equal or better, which the line before it says.

    python benchmarks/search_efficiency.py [--quick] [--seeds 0 1 2 3 4 5]

Best val accuracy on digits' 270 validation images moves in steps of 1/270 and differs by one
image between seeds, so the 3-seed median is a coarse check; `--seeds` runs more.
"""

from __future__ import annotations

import argparse
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
from pipeline.search import run_study, summarize, trial_rows  # noqa: E402

STRATEGIES = {
    "ours: tpe + hyperband": {"sampler": "tpe", "pruner": "hyperband"},
    "random, no pruning": {"sampler": "random", "pruner": "none"},
}


def run_one(strategy: dict, seed: int, n_trials: int, epochs: int, folder: Path, data) -> dict:
    db = folder / f"{seed}-{strategy['sampler']}.db"
    params = parse_params(
        {
            "seed": seed,
            "device": "cpu",
            "tracking": {"enabled": False},
            "search": {
                **strategy,
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
    return {
        "seed": seed,
        "epochs spent": summary["epochs_spent"],
        "best val acc": summary["best_val_accuracy"],
        "pruned": summary["n_pruned"],
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED")
    args = parser.parse_args()
    defaults = parse_params({}).search
    n_trials, epochs = (10, 6) if args.quick else (defaults.n_trials, defaults.epochs)
    data = DeviceData(prepare(parse_params({}).data, seed=0), torch.device("cpu"))
    rows, stats = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, strategy in STRATEGIES.items():
            runs = [
                run_one(strategy, seed, n_trials, epochs, Path(tmp), data) for seed in args.seeds
            ]
            rows += [{"strategy": label, **r} for r in runs]
            stats[label] = (
                statistics.median(r["epochs spent"] for r in runs),
                statistics.median(r["best val acc"] for r in runs),
                statistics.mean(r["best val acc"] for r in runs),
            )
    print(f"machine: {machine()}")
    seeds = " ".join(map(str, args.seeds))
    print(f"{n_trials} trials x up to {epochs} epochs, digits, seeds {seeds}")
    print_table(rows, ["strategy", "seed", "epochs spent", "best val acc", "pruned", "seconds"])
    (ours_epochs, ours_acc, ours_mean), (rand_epochs, rand_acc, rand_mean) = stats.values()
    verdict = "equal or better" if ours_acc >= rand_acc else "WORSE"
    print(f"mean best val accuracy: ours {ours_mean:.4f}, random {rand_mean:.4f}")
    print(f"median best val accuracy: ours {ours_acc:.4f}, random {rand_acc:.4f} ({verdict})")
    print(f"speedup: {rand_epochs / ours_epochs:.2f}x")


if __name__ == "__main__":
    main()
