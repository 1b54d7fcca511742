"""Scaling of the search stage: wall time as n_trials doubles (8, 16, 32), with 1 and 2 workers.

Runs the search stage's study loop (`pipeline.search_study.run_study`, default params: digits, cnn,
TPE + Hyperband, every trial a nested MLflow run in a temp sqlite store) in a temp project
folder. Seconds per finished trial show how cost grows with work; the last line is the
2-worker speedup at the largest n_trials.

    python benchmarks/scaling.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine, print_table  # noqa: E402

from pipeline import paths  # noqa: E402
from pipeline.config import parse_params  # noqa: E402
from pipeline.data import prepare, save_prepared  # noqa: E402
from pipeline.search_study import run_study  # noqa: E402
from pipeline.tracking import stage_run  # noqa: E402
from pipeline.train import load_device_data  # noqa: E402


def timed_search(n_trials: int, workers: int, epochs: int, folder: Path) -> dict:
    name = f"n{n_trials}-w{workers}"
    params = parse_params(
        {
            "device": "cpu",
            "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": "scaling"},
            "search": {
                "n_trials": n_trials,
                "workers": workers,
                "epochs": epochs,
                "storage": f"sqlite:///{folder / (name + '.db')}",
            },
        }
    )
    data = load_device_data(params)
    with stage_run("search", params, "bench") as tracker:
        start = time.perf_counter()
        study = run_study(params, data, name, tracker.run_id, progress=False)
        seconds = time.perf_counter() - start
    finished = sum(t.state.is_finished() and t.state.name != "FAIL" for t in study.trials)
    return {
        "n_trials": n_trials,
        "workers": workers,
        "finished": finished,
        "seconds": seconds,
        "s / trial": seconds / n_trials,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sizes = (4, 8) if args.quick else (8, 16, 32)
    epochs = 4 if args.quick else parse_params({}).search.epochs
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.chdir(folder)  # workers read data/prepared from the project root (cwd)
        save_prepared(prepare(parse_params({}).data, seed=0), paths.PREPARED_DIR)
        for workers in (1, 2):
            rows += [timed_search(n, workers, epochs, folder) for n in sizes]
    print(f"machine: {machine()}, {os.cpu_count()} cores")
    print_table(rows, ["n_trials", "workers", "finished", "seconds", "s / trial"])
    last = {r["workers"]: r["seconds"] for r in rows if r["n_trials"] == sizes[-1]}
    print(f"speedup: {last[1] / last[2]:.2f}x")


if __name__ == "__main__":
    main()
