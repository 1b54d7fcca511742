"""The search stage's study runner: N worker processes on one Optuna study, and the study's
trials as rows and a summary.

`run_study` runs the study (`pipeline.study`: sampler, pruner, objective, storage) to
`search.n_trials` finished trials with `search.workers` processes, each with its share of the
CPU threads; `trial_rows` / `summarize` turn the study into `studies/trials.csv` rows and the
search record's counts (trials complete / pruned / failed, epochs spent and saved);
`snapshot_study` keeps DVC's `studies/optuna.db` output when the study lives elsewhere (a
queued or `--temp` experiment's copy, a PostgreSQL server).
The search stage (`pipeline.search`) and the benchmarks call these.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import torch
from tqdm.auto import tqdm

from pipeline import paths
from pipeline.config import Params, parse_params
from pipeline.data import DeviceData
from pipeline.engine import fit
from pipeline.files import atomic_path
from pipeline.study import (
    enqueue_current_params,
    is_skipped,
    load_study,
    make_objective,
    open_storage,
    reconcile_stale_runs,
    run_worker,
)
from pipeline.train import load_device_data

TRIAL_COLUMNS = [
    "number",
    "state",
    "lr",
    "batch_size",
    "weight_decay",
    "width",
    "depth",
    "value",
    "objective_cost",
    "latency_ms",
    "macs",
    "params",
    "epochs_run",
    "seconds",
    "worker",
    "fail_reason",
]


class TrialTrainer:
    """train_fn for the objective: a fresh seeded model of the trial's architecture
    (`recipe.model`), trained with `recipe.train` by the shared engine.

    It keeps the weights (on the CPU) of the trials it trains to the end, up to `KEEP_BYTES`
    (over it, the lowest val accuracy goes first), so the search stage can ship its chosen
    trial's own model instead of training it again (`outcome`)."""

    KEEP_BYTES = 512 * 2**20

    def __init__(self, params: Params, data: DeviceData, keep: bool = True):
        """keep: False where no kept model would be shipped (extra workers, search-worker
        machines, a data-parallel retrain)."""
        self.params, self.data, self.keep = params, data, keep
        self.kept: dict[str, tuple] = {}  # recipe hash -> (arch, CPU state dict, FitResult, bytes)

    def __call__(self, recipe: Params, on_epoch):
        from pipeline.checkpoint import arch_spec, build_model

        torch.manual_seed(self.params.seed)
        arch = arch_spec(recipe, self.data.info)
        model = build_model(arch)
        result = fit(
            model,
            self.data,
            recipe.train,
            seed=self.params.seed,
            on_epoch=on_epoch,
            progress=False,
        )
        if self.keep and result.status == "ok":  # a stopped trial raised in on_epoch
            self._keep(recipe.hash(), arch, model, result)
        return result

    def _keep(self, key: str, arch: dict, model: torch.nn.Module, result) -> None:
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        size = sum(v.numel() * v.element_size() for v in state.values())
        self.kept[key] = (arch, state, result, size)
        while sum(k[3] for k in self.kept.values()) > self.KEEP_BYTES:
            worst = min(self.kept, key=lambda k: self.kept[k][2].val_accuracy)
            del self.kept[worst]

    def outcome(self, recipe: Params):
        """The trained model and record of a trial of `recipe` this trainer kept (its test split
        scored now, for the report), or None."""
        from pipeline.checkpoint import build_model
        from pipeline.train import scored

        kept = self.kept.get(recipe.hash())
        if kept is None:
            return None
        arch, state, result, _ = kept
        model = build_model(arch)
        model.load_state_dict(state)
        return scored(model.to(self.data.device), arch, result, recipe.train, self.data)


def _worker_threads(workers: int) -> int:
    """Torch threads per worker: this process's CPU share (taskset, cgroup cpusets, or
    `OMP_NUM_THREADS` when set: say `OMP_NUM_THREADS=1 dvc queue start -j 2` to run two queued
    experiments on 2 cores) split between the workers, so N workers never oversubscribe."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        cpus = min(cpus or int(omp), int(omp))
    return max(1, (cpus or 1) // workers)


@contextlib.contextmanager
def trial_threads(params: Params) -> Iterator[None]:
    """Torch threads as every trial of this machine has them (`_worker_threads`) for the body,
    then as before (later stages get every thread back). The search's retrain runs in it too:
    a different thread count changes the float sums, and a retrain meant to reproduce its
    trial's score then drifts (4 of 270 val images on a high learning rate, seen in CI)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(_worker_threads(params.search.workers))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def extra_workers(
    target: Callable, params: Params, name: str, parent_run_id: str | None, deadline
) -> Iterator[None]:
    """Run `target(params dict, name, parent_run_id, i, deadline)` in spawned processes for
    workers i = 1 .. search.workers - 1 (worker 0 is the body, in this process); wait for them
    when the body ends, and stop those still running when it raises."""
    context = multiprocessing.get_context("spawn")
    extra = [
        context.Process(
            target=target, daemon=True, args=(params.to_dict(), name, parent_run_id, i, deadline)
        )
        for i in range(1, params.search.workers)
    ]
    for proc in extra:
        proc.start()
    try:
        yield
        for proc in extra:
            proc.join()
    finally:
        for proc in extra:
            if proc.is_alive():
                proc.terminate()


def _worker_process(raw_params: dict, name: str, parent_run_id, index: int, deadline) -> None:
    """Entry point of an extra worker process (spawned): own data, own sampler seed."""
    params = parse_params(raw_params)
    torch.set_num_threads(_worker_threads(params.search.workers))
    data = load_device_data(params, index)
    study = load_study(params, name, worker=index)
    trainer = TrialTrainer(params, data, keep=False)
    objective = make_objective(params, data, parent_run_id, trainer, index)
    run_worker(study, objective, params.search.n_trials, deadline)


def run_study(
    params: Params,
    data: DeviceData,
    name: str,
    parent_run_id: str | None,
    progress: bool = True,
    trainer: TrialTrainer | None = None,
) -> optuna.Study:
    """Run the study to `search.n_trials` finished trials with `search.workers` processes; this
    process's trials are trained by `trainer` (a new TrialTrainer when None)."""
    s = params.search
    study = load_study(params, name)
    if parent_run_id:
        study.set_user_attr("mlflow_parent_run_id", parent_run_id)
    enqueue_current_params(study, params)
    reconcile_stale_runs(params, study)
    deadline = time.time() + s.timeout_s if s.timeout_s else None
    bar = tqdm(
        total=s.n_trials, desc=f"search {name}", unit="trial", disable=None if progress else True
    )

    def on_progress(c):
        bar.update(min(c["finished"], s.n_trials) - bar.n)

    try:
        with (
            trial_threads(params),
            extra_workers(_worker_process, params, name, parent_run_id, deadline),
        ):
            trainer = trainer or TrialTrainer(params, data)
            objective = make_objective(params, data, parent_run_id, trainer)
            run_worker(study, objective, s.n_trials, deadline, on_progress)
    finally:
        bar.close()
    reconcile_stale_runs(params, study)
    return study


def trial_rows(study: optuna.Study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                **{k: t.params.get(k) for k in ("lr", "batch_size", "weight_decay")},
                "width": t.params.get("width"),
                "depth": t.params.get("depth"),
                "value": t.values[0] if t.values else None,  # val accuracy
                **{k: t.user_attrs.get(k) for k in ("objective_cost", "latency_ms", "macs")},
                "params": t.user_attrs.get("params"),
                "epochs_run": t.user_attrs.get("epochs_run", len(t.intermediate_values)),
                "seconds": t.user_attrs.get("seconds"),
                "worker": t.user_attrs.get("worker"),
                "fail_reason": t.user_attrs.get("fail_reason", ""),
            }
        )
    return rows


def summarize(params: Params, study: optuna.Study, rows: list[dict]) -> dict:
    """The search record's counts; `best_trial`: the most accurate complete trial (the earliest
    of equals; in a Pareto study the shipped one may be another: `pareto_study.select`)."""
    real = [r for r in rows if not is_skipped(r["fail_reason"])]
    pruned = [r for r in real if r["state"] == "PRUNED"]
    best = max(
        (r for r in rows if r["state"] == "COMPLETE"), key=lambda r: (r["value"], -r["number"])
    )
    return {
        "study_name": study.study_name,
        "best_trial_val_accuracy": round(best["value"], 6),
        "best_trial": best["number"],
        "n_complete": sum(r["state"] == "COMPLETE" for r in real),
        "n_pruned": len(pruned),
        "n_failed": sum(r["state"] == "FAIL" for r in real),
        "epochs_spent": sum(r["epochs_run"] for r in real),
        "epochs_saved_by_pruning": sum(params.search.epochs - r["epochs_run"] for r in pruned),
        "epochs_without_pruning": params.search.epochs
        * len([r for r in real if r["state"] != "FAIL"]),
    }


STUDY_FILE = paths.STUDIES_DIR / "optuna.db"  # the search stage's DVC output


def snapshot_study(url: str, name: str | None = None) -> Path | None:
    """Make DVC's `studies/optuna.db` output hold the study as this run left it, when the study
    lives elsewhere; return that file, or None when the study is that file already.

    - A relative SQLite study in the project's own folder while this stage runs in a copy (a
      queued or `--temp` DVC experiment): the project's file, copied whole (SQLite's online
      backup).
    - Any other storage (PostgreSQL on several machines, an SQLite file elsewhere): study
      `name` copied with `optuna.copy_study` into a new SQLite file (written aside, then
      renamed: never half a file)."""
    import sqlite3

    project_url = paths.storage_url(url)
    if ":memory:" in url:  # gone with the process that ran it
        return None
    if project_url.startswith("sqlite:///"):
        source = Path(project_url.removeprefix("sqlite:///").split("?")[0])
        if source.resolve() == STUDY_FILE.resolve():
            return None
        if project_url != url:  # a relative file: the project's own, seen from a DVC copy
            with (
                atomic_path(STUDY_FILE) as tmp,
                contextlib.closing(sqlite3.connect(source)) as origin,
                contextlib.closing(sqlite3.connect(tmp)) as copy,
            ):
                origin.backup(copy)
            return STUDY_FILE
    if name is None:
        return None
    with atomic_path(STUDY_FILE) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.copy_study(
            from_study_name=name,
            from_storage=open_storage(project_url),
            to_storage=f"sqlite:///{tmp}",
        )
    return STUDY_FILE
