"""search stage: Optuna over lr / batch size / weight decay; the winner becomes the tuned model.

Reads: params.yaml (`seed`, `device`, `model`, `train`, `search`, `tracking`), `data/prepared/`,
`models/baseline.pt` (the baseline to compare with; optional outside DVC).
Writes: the study in `search.storage` (default `studies/optuna.db`, a persistent DVC output, so a
crashed or extended search resumes), `studies/best_params.json`, `studies/trials.csv`,
`models/tuned.pt`, `metrics/search.json` (the tuned model's val and test accuracy),
`reports/search.json` (the whole record), `plots/search_*.png`; one MLflow run (the flattened
params, like every stage) with every trial nested under it. `search.workers: N` runs N
processes on the study (several machines: point them at one PostgreSQL `search.storage`).
A relative SQLite `search.storage` lies in the project's own folder, also for a queued or
`--temp` DVC experiment. Run: `dvc repro search`, `pipeline search`.

Decisions, all on the val split:
1. Each trial's objective is the val accuracy of the model it would ship (its last epoch).
2. A study whose best trial is not above chance level (the Wilson 95 % interval of its val
   accuracy reaches the majority-class share) fails the stage: nothing was learnt.
3. The winner is retrained exactly as its trial was scored (its params, `search.epochs`, the
   same seed), so `tuned_val_accuracy` reproduces `best_trial_val_accuracy` within noise.
4. Never ship worse than the user had: the retrained winner and the baseline are compared on
   the same val images (`pipeline.stats.paired_difference`); when the winner is worse beyond
   the noise (the 95 % interval of the difference lies below 0), `models/tuned.pt` is the
   baseline, `tuned_source: baseline`, and stderr says so. The test split is scored for the
   report only.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState
from torch import nn
from tqdm.auto import tqdm

from pipeline import paths
from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.config import Params, load_params, parse_params
from pipeline.data import DeviceData
from pipeline.engine import correct_per_image, fit
from pipeline.errors import ConfigError, StageFailed, stage_entry
from pipeline.files import write_json
from pipeline.plots import search_plots, write_csv
from pipeline.reporting import search_summary
from pipeline.results import write_results
from pipeline.stats import PairedDifference, accuracy_interval, paired_difference
from pipeline.study import (
    enqueue_current_params,
    is_skipped,
    load_study,
    make_objective,
    reconcile_stale_runs,
    run_worker,
    study_name,
)
from pipeline.tracking import check_tracking, stage_run
from pipeline.train import load_device_data, train_and_evaluate

# metrics/search.json; the rest of the record (study name, tuned_source, the baseline
# comparison, seconds) goes to reports/search.json
METRIC_KEYS = ("tuned_val_accuracy", "tuned_test_accuracy")

TRIAL_COLUMNS = [
    "number",
    "state",
    "lr",
    "batch_size",
    "weight_decay",
    "value",
    "epochs_run",
    "seconds",
    "worker",
    "fail_reason",
]


@dataclass
class Shipped:
    """What `models/tuned.pt` holds: the retrained winner, or the baseline when it is better."""

    source: str  # "search" | "baseline"
    model: nn.Module
    arch: dict
    params: Params  # the resolved params it was trained with
    metrics: dict  # val_accuracy, test_accuracy, ...


@dataclass
class SearchOutcome:
    study: optuna.Study
    trials: list[dict]
    best: dict
    tuned: Shipped
    metrics: dict


def _trial_trainer(params: Params, data: DeviceData):
    """train_fn for the objective: a fresh seeded model trained by the shared engine."""
    from pipeline.checkpoint import arch_spec, build_model

    arch = arch_spec(params, data.info)

    def train_fn(train_cfg, on_epoch):
        torch.manual_seed(params.seed)
        model = build_model(arch)
        return fit(model, data, train_cfg, seed=params.seed, on_epoch=on_epoch, progress=False)

    return train_fn


def _worker_threads(workers: int) -> int:
    """Torch threads per worker: this process's CPU share (taskset, cgroup cpusets) split
    between the workers, so N workers never oversubscribe the cores."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 1) // workers)


def _worker_process(raw_params: dict, name: str, parent_run_id, index: int, deadline) -> None:
    """Entry point of an extra worker process (spawned): own data, own sampler seed."""
    params = parse_params(raw_params)
    torch.set_num_threads(_worker_threads(params.search.workers))
    data = load_device_data(params, index)
    study = load_study(params, name, worker=index)
    objective = make_objective(params, data, parent_run_id, _trial_trainer(params, data), index)
    run_worker(study, objective, params.search.n_trials, deadline)


def run_study(
    params: Params, data: DeviceData, name: str, parent_run_id: str | None, progress: bool = True
) -> optuna.Study:
    """Run the study to `search.n_trials` finished trials with `search.workers` processes."""
    s = params.search
    study = load_study(params, name)
    if parent_run_id:
        study.set_user_attr("mlflow_parent_run_id", parent_run_id)
    enqueue_current_params(study, params)
    reconcile_stale_runs(params, study)
    deadline = time.time() + s.timeout_s if s.timeout_s else None
    context = multiprocessing.get_context("spawn")
    extra = [
        context.Process(
            target=_worker_process,
            daemon=True,
            args=(params.to_dict(), name, parent_run_id, i, deadline),
        )
        for i in range(1, s.workers)
    ]
    for proc in extra:
        proc.start()
    threads = torch.get_num_threads()
    torch.set_num_threads(_worker_threads(s.workers))
    bar = tqdm(
        total=s.n_trials, desc=f"search {name}", unit="trial", disable=None if progress else True
    )

    def on_progress(c):
        bar.update(min(c["finished"], s.n_trials) - bar.n)

    try:
        objective = make_objective(params, data, parent_run_id, _trial_trainer(params, data))
        run_worker(study, objective, s.n_trials, deadline, on_progress)
        for proc in extra:
            proc.join()
    finally:
        bar.close()
        torch.set_num_threads(threads)  # the retrain and later stages get every thread back
        for proc in extra:
            if proc.is_alive():
                proc.terminate()
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
                "value": t.value,
                "epochs_run": t.user_attrs.get("epochs_run", len(t.intermediate_values)),
                "seconds": t.user_attrs.get("seconds"),
                "worker": t.user_attrs.get("worker"),
                "fail_reason": t.user_attrs.get("fail_reason", ""),
            }
        )
    return rows


def summarize(params: Params, study: optuna.Study, rows: list[dict]) -> dict:
    real = [r for r in rows if not is_skipped(r["fail_reason"])]
    pruned = [r for r in real if r["state"] == "PRUNED"]
    return {
        "study_name": study.study_name,
        "best_trial_val_accuracy": round(study.best_value, 6),
        "best_trial": study.best_trial.number,
        "n_complete": sum(r["state"] == "COMPLETE" for r in real),
        "n_pruned": len(pruned),
        "n_failed": sum(r["state"] == "FAIL" for r in real),
        "epochs_spent": sum(r["epochs_run"] for r in real),
        "epochs_saved_by_pruning": sum(params.search.epochs - r["epochs_run"] for r in pruned),
        "epochs_without_pruning": params.search.epochs
        * len([r for r in real if r["state"] != "FAIL"]),
    }


def check_above_chance(best_value: float, data: DeviceData, params: Params) -> None:
    """StageFailed when the best trial's val accuracy is not above chance level (within noise).

    Chance is the majority class's share of the val split; the 95 % Wilson interval of the best
    accuracy must lie above it."""
    labels = data.y["val"].cpu()
    n = len(labels)
    chance = torch.bincount(labels).max().item() / n
    hits = round(best_value * n)
    low, _ = accuracy_interval([True] * hits + [False] * (n - hits))
    if low <= chance:
        raise StageFailed(
            f"search: every trial is at chance level (best val accuracy {best_value:.4f} on {n} "
            f"images, chance {chance:.4f}); nothing was learnt: check search.space.lr "
            f"{list(params.search.space.lr)} and search.epochs ({params.search.epochs})"
        )


def load_baseline(path: Path | None, data: DeviceData) -> Shipped | None:
    """The train stage's model, when its checkpoint exists and was trained on this dataset."""
    if path is None or not Path(path).is_file():
        return None
    model, blob = load_checkpoint(path)
    if blob.get("dataset_sha256") != data.info["sha256"]["all"]:
        print(f"search: {path} was trained on other data; not compared", file=sys.stderr)
        return None
    try:
        baseline_params = parse_params(blob["config"])
    except ConfigError as err:
        print(f"search: {path} has unusable params ({err}); not compared", file=sys.stderr)
        return None
    return Shipped("baseline", model, blob["arch"], baseline_params, dict(blob["metrics"]))


def choose_tuned(
    winner: Shipped, baseline: Shipped | None, data: DeviceData
) -> tuple[Shipped, PairedDifference | None]:
    """The winner, unless the baseline beats it on val beyond the noise (interval below 0)."""
    if baseline is None:
        return winner, None
    difference = paired_difference(
        correct_per_image(winner.model, data), correct_per_image(baseline.model, data)
    )
    if difference.high < 0:
        return baseline, difference
    return winner, difference


def run(
    params: Params,
    data: DeviceData,
    baseline_path: Path | None = paths.BASELINE_CKPT,
    parent_run_id: str | None = None,
    progress: bool = True,
) -> SearchOutcome:
    """Search; retrain the winner as its trial was scored; ship it unless the baseline wins."""
    name = study_name(params, data.info["sha256"]["all"])
    start = time.perf_counter()
    study = run_study(params, data, name, parent_run_id, progress)
    search_seconds = time.perf_counter() - start
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise StageFailed(f"search: no trial of study {name} completed; see studies/trials.csv")
    rows = trial_rows(study)
    metrics = summarize(params, study, rows)
    check_above_chance(study.best_value, data, params)
    best = {
        "params": study.best_params,
        "value": study.best_value,
        "trial": study.best_trial.number,
    }
    # exactly the trial's recipe: its params, search.epochs (its OneCycle length), its seed
    tuned_cfg = dataclasses.replace(params.train, **study.best_params, epochs=params.search.epochs)
    retrained = train_and_evaluate(params, data, tuned_cfg, description="retrain best")
    if retrained.fit.status != "ok":
        raise StageFailed(f"search: retraining the best params diverged: {retrained.fit.message}")
    winner = Shipped(
        "search",
        retrained.model,
        retrained.arch,
        dataclasses.replace(params, train=tuned_cfg),
        retrained.metrics,
    )
    baseline = load_baseline(baseline_path, data)
    tuned, difference = choose_tuned(winner, baseline, data)
    metrics.update(
        tuned_source=tuned.source,
        retrained_val_accuracy=retrained.metrics["val_accuracy"],
        tuned_val_accuracy=tuned.metrics["val_accuracy"],
        tuned_test_accuracy=tuned.metrics["test_accuracy"],
        baseline_val_accuracy=baseline.metrics.get("val_accuracy") if baseline else None,
        baseline_test_accuracy=baseline.metrics.get("test_accuracy") if baseline else None,
        **(difference.record("search_minus_baseline_val_") if difference else {}),
        search_seconds=round(search_seconds, 2),
        retrain_seconds=retrained.metrics["train_seconds"],
    )
    return SearchOutcome(study, rows, best, tuned, metrics)


def _save_outputs(params: Params, outcome: SearchOutcome, info: dict, tracker) -> None:
    write_json(paths.STUDIES_DIR / "best_params.json", outcome.best)
    write_csv(paths.STUDIES_DIR / "trials.csv", outcome.trials, TRIAL_COLUMNS)
    tuned = outcome.tuned
    save_checkpoint(
        paths.TUNED_CKPT,
        tuned.model,
        tuned.arch,
        tuned.params,
        info,
        {**tuned.metrics, "search": outcome.best, "tuned_source": tuned.source},
    )
    write_results("search", outcome.metrics, METRIC_KEYS)
    pngs = search_plots(outcome.study, paths.PLOTS_DIR)
    tracker.log_metrics({k: v for k, v in outcome.metrics.items() if k != "best_trial"})
    tracker.set_tags({"tuned_source": tuned.source})
    tracker.log_params({f"best.{k}": v for k, v in outcome.best["params"].items()})
    for path in [*pngs, paths.STUDIES_DIR / "trials.csv", paths.STUDIES_DIR / "best_params.json"]:
        tracker.log_artifact(path, "search")


def snapshot_study(url: str) -> Path | None:
    """When a relative SQLite study lives in the project's own folder but this stage runs in a
    copy (a queued or `--temp` DVC experiment), copy the study into the copy's file (SQLite's
    online backup), so that DVC's `studies/optuna.db` output exists and holds what this
    experiment saw; return that file. None when the study is already there, or not SQLite."""
    import contextlib
    import sqlite3

    project_url = paths.storage_url(url)
    if project_url == url:
        return None
    local = Path(url.removeprefix("sqlite:///").split("?")[0])
    project_file = Path(project_url.removeprefix("sqlite:///").split("?")[0])
    if local.resolve() == project_file.resolve():
        return None
    local.parent.mkdir(parents=True, exist_ok=True)
    local.unlink(missing_ok=True)
    with (
        contextlib.closing(sqlite3.connect(project_file)) as source,
        contextlib.closing(sqlite3.connect(local)) as copy,
    ):
        source.backup(copy)
    return local


@stage_entry
def main(argv: list[str] | None = None) -> None:
    params = load_params(paths.PARAMS)
    check_tracking(params)  # before any work: the study is opened before the run starts
    data = load_device_data(params)
    info = data.info
    paths.STUDIES_DIR.mkdir(parents=True, exist_ok=True)
    name = study_name(params, info["sha256"]["all"])
    resume = load_study(params, name).user_attrs.get("mlflow_parent_run_id")
    with stage_run(
        "search", params, info["sha256"]["all"], run_name=f"search {name}", resume_run_id=resume
    ) as tracker:
        tracker.log_params(params.to_dict())
        tracker.set_tags({"study_name": name})
        outcome = run(params, data, paths.BASELINE_CKPT, tracker.run_id)
        _save_outputs(params, outcome, info, tracker)
    snapshot_study(params.search.storage)
    print(search_summary(outcome.metrics, outcome.best["params"]), file=sys.stderr)


if __name__ == "__main__":
    main()
