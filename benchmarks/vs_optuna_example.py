"""Search against the Optuna examples' way: wall clock and best val accuracy, side by side.

- `example`: the loop of Optuna's PyTorch examples, written as a competent user would: a
  `DataLoader` (shuffle) over a `TensorDataset` of the already-normalised in-memory tensors, the
  plain zero_grad / forward / backward / step loop, the val split scored after every epoch,
  `trial.report` + `trial.should_prune()` with Optuna's default `MedianPruner`, a seeded
  `TPESampler`, in-memory storage. Same model (our `cnn`), same recipe (SGD with Nesterov
  momentum 0.9, weight decay, OneCycle over the trial's epochs), same space, trial count and
  epoch budget as ours. Its own process: imports torch and optuna, loads the prepared tensors.
- `ours`: `python -m pipeline.search` run as a user runs it, in a fresh copy of a project
  folder (params.yaml and data/prepared/): its sqlite study in studies/optuna.db, MLflow
  tracking into the project's mlflow.db (a parent run, one nested run per trial), the winner
  shipped (its trial's model; retrained before 2026-11-28 19:30), outputs, plots; no baseline
  model (`models/baseline.pt` absent).

Wall clock of each whole process, both pinned as the caller pinned this one
(`taskset -c 1 env OMP_NUM_THREADS=1`); the two sides alternate order per seed. Tasks (both
offline): `digits` (the default pipeline) and `digits-150-wide` (the harder task of
`search_efficiency.py`: 150 training images, `cnn` 16-32, lr 1e-4..10, weight decay 1e-6..0.1).
Per task: median wall clock and the median (min-max) best val accuracy of each side; the ratio
of the example's wall clock to ours, per seed and overall. The last line is the ratio of the
summed wall clocks over every task and seed.

    taskset -c 1 env OMP_NUM_THREADS=1 python benchmarks/vs_optuna_example.py [--quick]
        [--seeds 0 1 2 3 4] [--tasks digits digits-150-wide] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HARD = "digits-150-wide"
TASKS = {
    "digits": {},
    HARD: {
        "train_images": 150,
        "model": {"widths": [16, 32]},
        "space": {"lr": [1e-4, 10.0], "weight_decay": [1e-6, 0.1]},
    },
}


def example(project: Path, seed: int, n_trials: int, epochs: int, task: dict) -> dict:
    """The Optuna examples' way (run in its own process: `--example`)."""
    start = time.perf_counter()
    import optuna
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    sys.path.insert(0, str(ROOT))
    from pipeline.models import create_model

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    info = json.loads((project / "data/prepared/dataset.json").read_text())
    mean = torch.tensor(info["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(info["std"]).view(1, -1, 1, 1)

    def split(name):
        blob = torch.load(project / f"data/prepared/{name}.pt", weights_only=True)
        return (blob["images"].float() / 255 - mean) / std, blob["labels"]

    (x_train, y_train), (x_val, y_val) = split("train"), split("val")
    space = {"lr": [0.001, 1.0], "weight_decay": [1e-6, 1e-2], **task.get("space", {})}
    widths = task.get("model", {}).get("widths", [32, 64, 128])
    epochs_run = []

    def objective(trial):
        lr = trial.suggest_float("lr", *space["lr"], log=True)
        batch_size = trial.suggest_categorical("batch_size", [32, 64, 128])
        weight_decay = trial.suggest_float("weight_decay", *space["weight_decay"], log=True)
        torch.manual_seed(seed)
        model = create_model("cnn", len(info["classes"]), *info["shape"][:2], widths=widths)
        loader = DataLoader(
            TensorDataset(x_train, y_train), batch_size=batch_size, shuffle=True, drop_last=True
        )
        optimizer = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay
        )
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=epochs * len(loader), pct_start=0.25
        )
        accuracy = 0.0
        for epoch in range(1, epochs + 1):
            epochs_run.append(trial.number)
            model.train()
            for inputs, targets in loader:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(inputs), targets)
                loss.backward()
                optimizer.step()
                scheduler.step()
            model.eval()
            with torch.no_grad():
                accuracy = (model(x_val).argmax(1) == y_val).float().mean().item()
            trial.report(accuracy, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return accuracy

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(),
    )
    optimize_start = time.perf_counter()
    study.optimize(objective, n_trials=n_trials)
    return {
        "best_val_accuracy": study.best_value,
        "epochs_spent": len(epochs_run),
        "study_seconds": time.perf_counter() - optimize_start,
        "in_process_seconds": time.perf_counter() - start,
    }


def make_template(folder: Path, task_name: str, n_trials: int, epochs: int) -> Path:
    """A project folder: params.yaml and data/prepared/ (the task's training subset)."""
    import torch
    import yaml

    from pipeline.config import parse_params
    from pipeline.data import Prepared, prepare, save_prepared

    task = TASKS[task_name]
    project = folder / f"template-{task_name}"
    params = parse_params({})
    prepared = prepare(params.data, seed=0)
    if task.get("train_images"):
        images, labels = prepared.splits["train"]
        per_class = task["train_images"] // len(prepared.info["classes"])
        keep = torch.cat([torch.nonzero(labels == c)[:per_class, 0] for c in labels.unique()])
        splits = dict(prepared.splits, train=(images[keep], labels[keep]))
        counts = {s: len(y) for s, (_, y) in splits.items()}
        sha = dict(prepared.info["sha256"], all=f"{prepared.info['sha256']['all']}-{task_name}")
        prepared = Prepared(splits, prepared.info | {"counts": counts, "sha256": sha})
    save_prepared(prepared, project / "data/prepared")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["device"] = "cpu"
    raw["model"].update(task.get("model", {}))
    raw["search"].update(n_trials=n_trials, epochs=epochs)
    raw["search"]["space"].update(task.get("space", {}))
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return project


def timed_run(command: list[str], **kwargs) -> tuple[subprocess.CompletedProcess, float, float]:
    """(result, wall seconds, CPU seconds of the process and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return done, seconds, cpu


def run_ours(template: Path, work: Path, profile: Path | None) -> dict:
    project = work / "ours"
    shutil.rmtree(project, ignore_errors=True)
    shutil.copytree(template, project)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable]
    if profile is not None:
        command += ["-m", "cProfile", "-o", str(profile)]
    command += ["-m", "pipeline.search"]
    done, seconds, cpu = timed_run(command, cwd=project, env=env)
    if done.returncode != 0:
        raise SystemExit(f"pipeline.search failed ({done.returncode}): {done.stderr[-2000:]}")
    record = json.loads((project / "reports/search.json").read_text())
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "best_val_accuracy": record["best_trial_val_accuracy"],
        "epochs_spent": record["epochs_spent"],
        "study_seconds": record["search_seconds"],
    }


def run_example(template: Path, seed: int, n_trials: int, epochs: int, task: str) -> dict:
    command = [
        sys.executable,
        __file__,
        "--example",
        json.dumps([str(template), seed, n_trials, epochs, task]),
    ]
    done, seconds, cpu = timed_run(command)
    if done.returncode != 0:
        raise SystemExit(f"example failed ({done.returncode}): {done.stderr[-2000:]}")
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        **json.loads(done.stdout.strip().splitlines()[-1]),
    }


def bookkeeping(folder: Path, n_trials: int, epochs: int = 5) -> list[dict]:
    """What a trial's records cost without its training, per trial: the storage calls our
    objective makes (3 suggestions, 6 user attributes, a report per epoch, the pruner asked at
    its rungs, TPE and successive halving as configured) on Optuna's in-memory storage (the
    example's), on our sqlite storage (`pipeline.study.make_storage`: heartbeat, retry of dead
    trials), and that plus the trial's nested MLflow run (`pipeline.tracking.ChildRun`: params,
    a batch of per-epoch metrics, closing tags and status)."""
    import optuna

    from pipeline.config import parse_params
    from pipeline.study import make_storage
    from pipeline.tracking import ChildRun, stage_run

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    params = parse_params(
        {"tracking": {"uri": f"sqlite:///{folder / 'bookkeeping.db'}", "experiment": "b"}}
    )
    rows = []
    for name, storage, tracked in (
        ("Optuna in memory (the example's)", None, False),
        ("Optuna sqlite (ours)", f"sqlite:///{folder / 'bookkeeping-optuna.db'}", False),
        ("Optuna sqlite + MLflow trial run (ours)", f"sqlite:///{folder / 'b2.db'}", True),
    ):
        with stage_run("search", params, "sha") as parent:

            def objective(trial, tracked=tracked):
                lr = trial.suggest_float("lr", 1e-3, 1.0, log=True)
                trial.suggest_categorical("batch_size", [32, 64, 128])
                trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True)
                for key in ("worker", "machine", "device"):
                    trial.set_user_attr(key, "x")
                run = (
                    ChildRun(params, parent.run_id, "t", {"state": "RUNNING"}) if tracked else None
                )
                if run is not None:
                    trial.set_user_attr("mlflow_run_id", run.run_id)
                    run.log_params(trial.params)
                for epoch in range(1, epochs + 1):
                    if run is not None:
                        run.log_metrics({"train_loss": 1.0, "val_accuracy": lr}, epoch)
                    trial.report(lr * epoch, epoch)
                    if epoch in (1, 2, 4):
                        trial.should_prune()
                trial.set_user_attr("seconds", 1.0)
                trial.set_user_attr("epochs_run", epochs)
                if run is not None:
                    run.finish("FINISHED", {"state": "COMPLETE"})
                return lr

            study = optuna.create_study(
                storage=make_storage(storage) if storage else None,
                sampler=optuna.samplers.TPESampler(seed=0, multivariate=True, constant_liar=True),
                pruner=optuna.pruners.SuccessiveHalvingPruner(reduction_factor=2),
                direction="maximize",
            )
            wall, cpu = time.perf_counter(), time.process_time()
            study.optimize(objective, n_trials=n_trials)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rows.append(
            {
                "records per trial": name,
                "ms / trial": 1000 * wall / n_trials,
                "CPU ms / trial": 1000 * cpu / n_trials,
                f"s per {n_trials} trials": wall,
            }
        )
    return rows


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.4f} ({min(values):.4f}-{max(values):.4f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, digits only")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--profile", action="store_true", help="cProfile our first run")
    parser.add_argument("--example", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.example:
        template, seed, n_trials, epochs, task = json.loads(args.example)
        print(json.dumps(example(Path(template), seed, n_trials, epochs, TASKS[task])))
        return
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import machine

    from pipeline.config import parse_params

    if args.quick:
        args.seeds, args.tasks = args.seeds[:2], args.tasks[:1]
    defaults = parse_params({}).search
    n_trials, epochs = defaults.n_trials, defaults.epochs
    totals = {"example": 0.0, "ours": 0.0}
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for task in args.tasks:
            template = make_template(folder, task, n_trials, epochs)
            results = {"example": [], "ours": []}
            for i, seed in enumerate(args.seeds):
                raw = (template / "params.yaml").read_text()
                seeded = folder / f"seed-{task}"
                shutil.rmtree(seeded, ignore_errors=True)
                shutil.copytree(template, seeded)
                (seeded / "params.yaml").write_text(raw.replace("seed: 0", f"seed: {seed}", 1))
                profile = folder / "ours.prof" if args.profile and i == 0 else None
                order = ["example", "ours"] if i % 2 == 0 else ["ours", "example"]
                for side in order:
                    if side == "ours":
                        r = run_ours(seeded, folder, profile)
                    else:
                        r = run_example(seeded, seed, n_trials, epochs, task)
                    results[side].append(r)
                    totals[side] += r["seconds"]
                e, o = results["example"][-1], results["ours"][-1]
                print(
                    f"{task} seed {seed}: example {e['seconds']:.1f} s (CPU "
                    f"{e['cpu_seconds']:.1f} s, study "
                    f"{e['study_seconds']:.1f} s, {e['epochs_spent']} epochs, best "
                    f"{e['best_val_accuracy']:.4f}); ours {o['seconds']:.1f} s (CPU "
                    f"{o['cpu_seconds']:.1f} s, study "
                    f"{o['study_seconds']:.1f} s, {o['epochs_spent']} epochs, best "
                    f"{o['best_val_accuracy']:.4f}); ratio {e['seconds'] / o['seconds']:.2f}x",
                    flush=True,
                )
                if profile is not None:
                    import pstats

                    print(f"cProfile of ours ({task}, seed {seed}), top 25 by cumulative time:")
                    pstats.Stats(str(profile)).sort_stats("cumulative").print_stats(25)
            ratios = [
                e["seconds"] / o["seconds"]
                for e, o in zip(results["example"], results["ours"], strict=True)
            ]
            summary.append(
                {
                    "task": task,
                    "example s": statistics.median(r["seconds"] for r in results["example"]),
                    "ours s": statistics.median(r["seconds"] for r in results["ours"]),
                    "example CPU s": statistics.median(
                        r["cpu_seconds"] for r in results["example"]
                    ),
                    "ours CPU s": statistics.median(r["cpu_seconds"] for r in results["ours"]),
                    "example study s": statistics.median(
                        r["study_seconds"] for r in results["example"]
                    ),
                    "ours study s": statistics.median(r["study_seconds"] for r in results["ours"]),
                    "example epochs": statistics.median(
                        r["epochs_spent"] for r in results["example"]
                    ),
                    "ours epochs": statistics.median(r["epochs_spent"] for r in results["ours"]),
                    "example best": spread([r["best_val_accuracy"] for r in results["example"]]),
                    "ours best": spread([r["best_val_accuracy"] for r in results["ours"]]),
                    "ratio": f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-"
                    f"{max(ratios):.2f})",
                }
            )
    from _common import print_table

    print(f"machine: {machine()}")
    print(f"{n_trials} trials x up to {epochs} epochs, seeds {' '.join(map(str, args.seeds))}")
    print_table(summary, list(summary[0]))
    with tempfile.TemporaryDirectory() as tmp:
        rows = bookkeeping(Path(tmp), n_trials)
    print(f"\nbookkeeping without training ({n_trials} trials of 5 epochs, this process):")
    print_table(rows, list(rows[0]))
    print(f"speedup: {totals['example'] / totals['ours']:.2f}x")


if __name__ == "__main__":
    main()
