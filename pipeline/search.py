"""search stage: Optuna over lr / batch size / weight decay (and, optionally, the architecture's
width / depth); the chosen trial becomes the tuned model.

Reads: params.yaml (`seed`, `device`, `model`, `train`, `search`, `tracking`), `data/prepared/`,
`models/baseline.pt` (the baseline to compare with; optional outside DVC).
Writes: the study in `search.storage` (default `studies/optuna.db`, a persistent DVC output, so a
crashed or extended search resumes), `studies/best_params.json`, `studies/trials.csv`,
`studies/pareto.csv` (the Pareto front; one objective: the best trial), `models/tuned.pt`,
`metrics/search.json` (the tuned model's val and test accuracy, the chosen trial; a Pareto
search: the front's size and hypervolume), `reports/search.json` (the whole record),
`plots/search_*.png`; one MLflow run (the flattened params, like every stage) with every trial
nested under it. `search.workers: N` runs N processes on the study (several machines: point
them at one PostgreSQL `search.storage`); each trial trains in one process. `train.nproc: N`
retrains the chosen trial data-parallel in N processes under torchrun
(`pipeline.train.train_recipe`). A relative SQLite `search.storage` lies in the
project's own folder, also for a queued or `--temp` DVC experiment. Run: `dvc repro search`,
`pipeline search`.

`search.objectives: [accuracy, latency | size | macs]` makes it a Pareto search with early
stopping (`pipeline.pareto_study`): each trial's architecture is timed in ONNX Runtime once per
study, trials stop at the successive-halving rungs unless they rank in the top 1/eta by
non-dominated sorting or lie on that rung's Pareto front, and `search.select` picks the front
trial to ship (the most accurate, the most accurate within a cost budget, or the cheapest above
an accuracy bar).

Decisions, all on the val split:
1. Each trial's objective is the val accuracy of the model it would ship (its last epoch).
2. A study whose best trial is not above chance level (the Wilson 95 % interval of its val
   accuracy reaches the majority-class share) fails the stage: nothing was learnt.
3. The chosen trial's own model is shipped when this process trained it (kept in memory,
   `search_study.TrialTrainer`; `winner_retrained: false`); otherwise (another worker or
   machine trained it, an earlier run, `train.nproc` > 1) it is retrained exactly as it was
   scored (its params and architecture, `search.epochs`, the same seed, the trials' torch
   thread count), so `winner_val_accuracy` reproduces its val accuracy within noise.
4. Never ship worse than the user had: the winner and the baseline are compared on
   the same val images (`pipeline.stats.paired_difference`); when the winner is worse beyond
   the noise (the 95 % interval of the difference lies below 0), `models/tuned.pt` is the
   baseline, `tuned_source: baseline`, and stderr says so (a Pareto search: only when the
   baseline's architecture fits the cost budget, never under `min_accuracy`). The test split is
   scored for the report only.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState
from torch import nn

from pipeline import pareto_study, paths
from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.config import Params, load_params, parse_params
from pipeline.data import DeviceData
from pipeline.engine import correct_per_image
from pipeline.errors import ConfigError, StageFailed, stage_entry
from pipeline.files import write_json
from pipeline.plots import save_figure, search_plots, write_csv
from pipeline.reporting import search_summary
from pipeline.results import write_results
from pipeline.search_space import trial_params
from pipeline.search_study import (
    TRIAL_COLUMNS,
    TrialTrainer,
    run_study,
    snapshot_study,
    summarize,
    trial_rows,
    trial_threads,
)
from pipeline.stats import PairedDifference, accuracy_interval, chance_level, paired_difference
from pipeline.study import load_study, study_name
from pipeline.tracking import check_tracking, stage_run
from pipeline.train import load_device_data, train_recipe

# metrics/search.json; the rest of the record (study name, tuned_source, the baseline
# comparison, seconds) goes to reports/search.json
METRIC_KEYS = ("tuned_val_accuracy", "tuned_test_accuracy")
# a Pareto search adds these (the hypervolume's reference point: reports/search.json)
PARETO_METRIC_KEYS = ("selected_trial", "n_pareto", "hypervolume")


@dataclass
class Shipped:
    """What `models/tuned.pt` holds: the chosen trial's model (kept or retrained), or the
    baseline when it is better."""

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
    metrics: dict  # the record for reports/search.json
    params: Params


def check_above_chance(best_value: float, data: DeviceData, params: Params) -> None:
    """StageFailed when the best trial's val accuracy is not above chance level (within noise).

    Chance is the majority class's share of the val split; the 95 % Wilson interval of the best
    accuracy must lie above it."""
    labels = data.y["val"].cpu()
    n = len(labels)
    chance = chance_level(labels)
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
    data: DeviceData | None = None,
    baseline_path: Path | None = paths.BASELINE_CKPT,
    parent_run_id: str | None = None,
    progress: bool = True,
) -> SearchOutcome:
    """Search; the chosen trial's model (its own, or retrained as its trial was scored); ship it
    unless the baseline wins.

    `data`: `load_device_data(params)` when None; `baseline_path`: None (or a missing file)
    compares with no baseline; `parent_run_id`: the MLflow run the trials nest under (None: no
    trial runs). Writes no file but the study's storage (`search.storage`); the record for
    `reports/search.json` is `SearchOutcome.metrics`.
    """
    data = data or load_device_data(params)
    name = study_name(params, data.info["sha256"]["all"])
    start = time.perf_counter()
    # the chosen trial's own model can be shipped when this process trained it and a retrain
    # would repeat the same computation (one process: not so with train.nproc > 1)
    trainer = TrialTrainer(params, data, keep=params.train.nproc <= 1)
    study = run_study(params, data, name, parent_run_id, progress, trainer)
    search_seconds = time.perf_counter() - start
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise StageFailed(f"search: no trial of study {name} completed; see studies/trials.csv")
    rows = trial_rows(study)
    metrics = summarize(params, study, rows)
    check_above_chance(metrics["best_trial_val_accuracy"], data, params)
    chosen, pareto = pareto_study.choose_trial(study, params, data.y["val"], data.info)
    metrics.update(pareto)
    best = {"params": chosen.params, "value": chosen.values[0], "trial": chosen.number}
    # exactly the trial's recipe: its params and architecture, search.epochs (its OneCycle
    # length), its seed
    recipe = trial_params(params, chosen.params)
    won = trainer.outcome(recipe)  # kept by this process; else retrained as scored
    winner_retrained = won is None
    if winner_retrained:
        with trial_threads(params):  # the trials' thread count: the same float sums as its trial
            won = train_recipe(recipe, data, "search", "retrain best")  # train.nproc ranks
    if won.fit.status != "ok":
        raise StageFailed(f"search: retraining the best params diverged: {won.fit.message}")
    winner = Shipped("search", won.model, won.arch, recipe, won.metrics)
    baseline = load_baseline(baseline_path, data)
    if baseline and not pareto_study.baseline_fits(study, baseline.arch, params, data.info):
        baseline = None
    tuned, difference = choose_tuned(winner, baseline, data)
    metrics.update(
        tuned_source=tuned.source,
        winner_val_accuracy=won.metrics["val_accuracy"],
        winner_retrained=winner_retrained,
        tuned_val_accuracy=tuned.metrics["val_accuracy"],
        tuned_test_accuracy=tuned.metrics["test_accuracy"],
        baseline_val_accuracy=baseline.metrics.get("val_accuracy") if baseline else None,
        baseline_test_accuracy=baseline.metrics.get("test_accuracy") if baseline else None,
        **(difference.record("search_minus_baseline_val_") if difference else {}),
        search_seconds=round(search_seconds, 2),
        retrain_seconds=won.metrics["train_seconds"] if winner_retrained else None,
        retrain_processes=won.metrics["processes"] if winner_retrained else None,
    )
    return SearchOutcome(study, rows, best, tuned, metrics, params)


def write_outputs(outcome: SearchOutcome, info: dict) -> list[Path]:
    """studies/best_params.json and trials.csv, models/tuned.pt, metrics/ and
    reports/search.json, plots/search_*.png (the study: `run`); returns the plots written."""
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
    write_results("search", outcome.metrics, METRIC_KEYS + PARETO_METRIC_KEYS)
    return [*search_plots(outcome.study, paths.PLOTS_DIR), write_pareto(outcome)]


def write_pareto(outcome: SearchOutcome) -> Path:
    """studies/pareto.csv (the front; a single-objective study: its best trial) and
    plots/search_pareto.png; returns the plot."""
    s, selected = outcome.params.search, outcome.best["trial"]
    if s.cost is None:
        rows = [r for r in outcome.trials if r["number"] == selected]
    else:
        rows = pareto_study.pareto_rows(outcome.study, outcome.params, selected)
    write_csv(paths.STUDIES_DIR / "pareto.csv", rows)
    fig, _ = pareto_study.figure(outcome.study, outcome.params, selected)
    save_figure(fig, paths.PLOTS_DIR / "search_pareto.png")
    return paths.PLOTS_DIR / "search_pareto.png"


def log_outcome(tracker, outcome: SearchOutcome, pngs: list[Path]) -> None:
    """The record's numbers, the source of tuned.pt as a tag, the best params, the files."""
    tracker.log_metrics({k: v for k, v in outcome.metrics.items() if k != "best_trial"})
    tracker.set_tags({"tuned_source": outcome.tuned.source})
    tracker.log_params({f"best.{k}": v for k, v in outcome.best["params"].items()})
    tables = [paths.STUDIES_DIR / f for f in ("trials.csv", "pareto.csv", "best_params.json")]
    for path in [*pngs, *tables]:
        tracker.log_artifact(path, "search")


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
        log_outcome(tracker, outcome, write_outputs(outcome, info))
    snapshot_study(params.search.storage, name)
    print(search_summary(outcome.metrics, outcome.best["params"]), file=sys.stderr)


if __name__ == "__main__":
    main()
