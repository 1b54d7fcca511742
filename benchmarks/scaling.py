"""Scaling of the search: trials per minute with 1 and 2 workers, on SQLite and on PostgreSQL.

Runs the search stage's study loop (`pipeline.search_study.run_study`: digits, the default cnn,
TPE; no pruner and one batch size, so every trial does the same work; every trial a nested
MLflow run in a temp SQLite tracking store) in a temp project folder, once per (storage,
workers), side by side in one run; `train s/trial` is the training alone, the rest of a
trial's time is the storage, MLflow and the worker start-up. The PostgreSQL server is a
throwaway cluster started like the tests start it (`tests/servers.py`); its rows are skipped,
with the reason, where PostgreSQL is not installed. Each worker process gets its share of this
process's CPUs as torch threads (`search_study._worker_threads`), so workers never
oversubscribe the cores. The last line is the 2-worker speedup in trials per minute on
PostgreSQL (on SQLite when PostgreSQL is missing).

    python benchmarks/scaling.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
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
from pipeline.search_study import _worker_threads, run_study  # noqa: E402
from pipeline.study import FINISHED, make_storage  # noqa: E402
from pipeline.tracking import stage_run  # noqa: E402
from pipeline.train import load_device_data  # noqa: E402
from tests.servers import postgres_cluster, postgres_missing  # noqa: E402


def timed_search(storage: str, label: str, workers: int, n_trials: int, epochs: int) -> dict:
    """Run one study of `n_trials` trials with `workers` processes; its rate."""
    name = f"{label}-w{workers}"
    params = parse_params(
        {
            "device": "cpu",
            "tracking": {"uri": f"sqlite:///{Path.cwd() / 'mlflow.db'}", "experiment": "scaling"},
            "search": {
                "n_trials": n_trials,
                "workers": workers,
                "epochs": epochs,
                "pruner": "none",
                "space": {"batch_size": [64]},  # every trial the same work: rates compare
                "storage": storage,
            },
        }
    )
    data = load_device_data(params)
    with stage_run("search", params, "bench") as tracker:
        start = time.perf_counter()
        study = run_study(params, data, name, tracker.run_id, progress=False)
        seconds = time.perf_counter() - start
    trials = study.get_trials(deepcopy=False, states=FINISHED)
    finished = len(trials)
    return {
        "storage": label,
        "workers": workers,
        "threads/worker": _worker_threads(workers),
        "trials": finished,
        "seconds": seconds,
        "trials/min": finished / seconds * 60,
        "train s/trial": sum(t.user_attrs["seconds"] for t in trials) / finished,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 trials of 2 epochs")
    args = parser.parse_args()
    n_trials, epochs = (6, 2) if args.quick else (16, 4)
    rows, skipped = [], postgres_missing()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        os.chdir(tmp)  # workers read data/prepared from the project root (cwd)
        save_prepared(prepare(parse_params({}).data, seed=0), paths.PREPARED_DIR)
        storages = {"sqlite": f"sqlite:///{Path(tmp) / 'studies.db'}"}
        if skipped is None:
            storages["postgresql"] = stack.enter_context(postgres_cluster()).url("scaling")
        for label, storage in storages.items():
            make_storage(storage)  # creates Optuna's tables (seconds on PostgreSQL): not timed
            rows += [timed_search(storage, label, w, n_trials, epochs) for w in (1, 2)]
    print(f"machine: {machine()}, {os.cpu_count()} cores, load average {load:.2f} at start")
    print(f"{n_trials} trials of {epochs} epochs, batch 64 (digits, default cnn, TPE, no pruner)")
    columns = ["storage", "workers", "threads/worker", "trials", "seconds", "trials/min"]
    print_table(rows, [*columns, "train s/trial"])
    if skipped:
        print(f"postgresql: skipped ({skipped})")
    rate = {(r["storage"], r["workers"]): r["trials/min"] for r in rows}
    label = "sqlite" if skipped else "postgresql"
    print(f"speedup: {rate[label, 2] / rate[label, 1]:.2f}x")


if __name__ == "__main__":
    main()
