"""search stage: Optuna over lr / batch size / weight decay, then retrain the best at full budget.

Reads: params.yaml (`seed`, `device`, `model`, `train`, `search`, `tracking`), `data/prepared/`,
`metrics/train.json` (the baseline to compare with).
Writes: the study in `search.storage` (default `studies/optuna.db`, a persistent DVC output, so a
crashed or extended search resumes), `studies/best_params.json`, `studies/trials.csv`,
`models/tuned.pt`, `metrics/search.json`, `plots/search_*.png`; one MLflow run with every trial
nested under it. `search.workers: N` runs N processes on the study (several machines: point
them at one PostgreSQL `search.storage`). Run: `dvc repro search`, `pipeline search`.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass

import optuna
import torch
from optuna.trial import TrialState
from tqdm.auto import tqdm

from pipeline import paths
from pipeline.checkpoint import save_checkpoint
from pipeline.config import Params, load_params, parse_params
from pipeline.data import DeviceData
from pipeline.engine import fit
from pipeline.errors import StageFailed, cli_entry
from pipeline.io import read_json, write_json
from pipeline.plots import search_plots, write_csv
from pipeline.study import (
    enqueue_current_params,
    load_study,
    make_objective,
    reconcile_stale_runs,
    run_worker,
    study_name,
)
from pipeline.tracking import stage_run
from pipeline.train import TrainOutcome, load_device_data, train_and_evaluate

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
class SearchOutcome:
    study: optuna.Study
    trials: list[dict]
    best: dict
    tuned: TrainOutcome
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
    return max(1, (os.cpu_count() or 1) // workers)


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
    real = [r for r in rows if r["fail_reason"] != "surplus"]
    pruned = [r for r in real if r["state"] == "PRUNED"]
    return {
        "study_name": study.study_name,
        "best_val_accuracy": round(study.best_value, 6),
        "best_trial": study.best_trial.number,
        "n_complete": sum(r["state"] == "COMPLETE" for r in real),
        "n_pruned": len(pruned),
        "n_failed": sum(r["state"] == "FAIL" for r in real),
        "epochs_spent": sum(r["epochs_run"] for r in real),
        "epochs_saved_by_pruning": sum(params.search.epochs - r["epochs_run"] for r in pruned),
        "epochs_without_pruning": params.search.epochs
        * len([r for r in real if r["state"] != "FAIL"]),
    }


def run(
    params: Params,
    data: DeviceData,
    baseline: dict,
    parent_run_id: str | None = None,
    progress: bool = True,
) -> SearchOutcome:
    """Search, then retrain the best params with the full `train.epochs` budget."""
    name = study_name(params, data.info["sha256"]["all"])
    start = time.perf_counter()
    study = run_study(params, data, name, parent_run_id, progress)
    search_seconds = time.perf_counter() - start
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise StageFailed(f"search: no trial of study {name} completed; see studies/trials.csv")
    rows = trial_rows(study)
    metrics = summarize(params, study, rows)
    best = {
        "params": study.best_params,
        "value": study.best_value,
        "trial": study.best_trial.number,
    }
    tuned_cfg = dataclasses.replace(params.train, **study.best_params)
    tuned = train_and_evaluate(params, data, tuned_cfg, description="retrain best")
    if tuned.fit.status != "ok":
        raise StageFailed(f"search: retraining the best params diverged: {tuned.fit.message}")
    metrics.update(
        tuned_val_accuracy=tuned.metrics["val_accuracy"],
        tuned_test_accuracy=tuned.metrics["test_accuracy"],
        baseline_test_accuracy=baseline.get("test_accuracy"),
        search_seconds=round(search_seconds, 2),
        retrain_seconds=tuned.metrics["train_seconds"],
    )
    return SearchOutcome(study, rows, best, tuned, metrics)


def _save_outputs(params: Params, outcome: SearchOutcome, info: dict, tracker) -> None:
    write_json(paths.STUDIES_DIR / "best_params.json", outcome.best)
    write_csv(paths.STUDIES_DIR / "trials.csv", outcome.trials, TRIAL_COLUMNS)
    tuned_cfg = dataclasses.replace(params.train, **outcome.best["params"])
    tuned_params = dataclasses.replace(params, train=tuned_cfg)
    save_checkpoint(
        paths.TUNED_CKPT,
        outcome.tuned.model,
        outcome.tuned.arch,
        tuned_params,
        info,
        {**outcome.tuned.metrics, "search": outcome.best},
    )
    write_json(paths.METRICS_DIR / "search.json", outcome.metrics)
    pngs = search_plots(outcome.study, paths.PLOTS_DIR)
    tracker.log_metrics({k: v for k, v in outcome.metrics.items() if k != "best_trial"})
    tracker.log_params({f"best.{k}": v for k, v in outcome.best["params"].items()})
    for path in [*pngs, paths.STUDIES_DIR / "trials.csv", paths.STUDIES_DIR / "best_params.json"]:
        tracker.log_artifact(path, "search")


@cli_entry
def main(argv: list[str] | None = None) -> None:
    params = load_params(paths.PARAMS)
    data = load_device_data(params)
    info = data.info
    baseline_path = paths.METRICS_DIR / "train.json"
    baseline = read_json(baseline_path) if baseline_path.is_file() else {}
    paths.STUDIES_DIR.mkdir(parents=True, exist_ok=True)
    name = study_name(params, info["sha256"]["all"])
    resume = load_study(params, name).user_attrs.get("mlflow_parent_run_id")
    with stage_run(
        "search", params, info["sha256"]["all"], run_name=f"search {name}", resume_run_id=resume
    ) as tracker:
        tracker.log_params({"search": dataclasses.asdict(params.search)})
        tracker.set_tags({"study_name": name})
        outcome = run(params, data, baseline, tracker.run_id)
        _save_outputs(params, outcome, info, tracker)
    m = outcome.metrics
    print(
        f"search {name}: {m['n_complete']} complete, {m['n_pruned']} pruned, {m['n_failed']} "
        f"failed in {m['search_seconds']:.1f}s; best val {m['best_val_accuracy']:.4f} "
        f"{outcome.best['params']}; tuned test {m['tuned_test_accuracy']:.4f} (baseline "
        f"{m['baseline_test_accuracy']}); {m['epochs_saved_by_pruning']} epochs saved by pruning",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
