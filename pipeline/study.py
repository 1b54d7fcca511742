"""The Optuna side of the search stage: study, sampler, pruner, objective, worker loop.

- A study lives in `search.storage` (any Optuna storage URL; default sqlite in `studies/`).
  Its default name is derived from the dataset, the model, the training recipe and the search
  space, so a changed space starts a new study and an unchanged one resumes.
- RDB storages record a heartbeat: a trial whose process died (kill -9) is failed after the
  grace period and re-queued with the same params (`RetryHeartbeatStaleTrialCallback`).
- `run_worker` runs trials until the study holds exactly `search.n_trials` finished trials
  (complete + pruned). A trial that would exceed that (two workers starting at once) stops at
  once as FAIL with reason `surplus`, before any training, and so does a second copy of the
  params.yaml trial (two machines starting a study together both enqueue it): `duplicate`.
  NaN losses and CUDA out-of-memory end a trial as FAIL with the reason recorded, and the
  study goes on.
- A trial's objective is the val accuracy of the model it would ship: the weights after its
  last epoch (not the best epoch's, which are not kept). The trial's MLflow run logs that value
  as `objective`, so sorting by it in the MLflow UI ranks trials as Optuna does.
- Samplers are seeded from `seed`, the machine (`PIPELINE_MACHINE_ID`, else the host name and
  the project's folder), the worker index and the study's trial count (hashed, so seed 1 /
  worker 0 never equals seed 0 / worker 1, and machines joining one study draw different
  start-up trials). TPE runs with `constant_liar` (running trials count as
  pessimistic observations, so parallel workers spread out).
- Pruners: `successive_halving` (default: one bracket, so TPE models every trial; with
  Hyperband, Optuna gives the sampler only the current bracket's trials and most trials are
  random start-up draws), `hyperband`, `median`, `none`.
- Each trial is an MLflow run nested under the search run (`pipeline.tracking.ChildRun`) with
  params, per-epoch `train_loss` / `val_accuracy` (written in batches by `ChildRun`), and a
  `state` tag; a pruned trial's run ends KILLED, a failed one FAILED, so the MLflow UI never
  shows them as successes. The pruner is asked only after epochs where it can stop a trial.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from pipeline import pareto_study, paths
from pipeline.config import Params
from pipeline.data import DeviceData
from pipeline.errors import ConfigError
from pipeline.search_space import current_point, suggest, trial_params
from pipeline.tracking import ChildRun, end_stale_run

HEARTBEAT_INTERVAL_S = 2
GRACE_PERIOD_S = 10
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# FAIL reasons of trials stopped before training (bookkeeping, not failures of a config)
SKIPPED_REASONS = ("surplus", "duplicate")


def is_skipped(fail_reason: str) -> bool:
    """True for a trial stopped before training (`surplus`, `duplicate: ...`)."""
    return fail_reason.split(":")[0] in SKIPPED_REASONS


class TrialFailed(Exception):
    """Ends a trial as FAIL with a recorded reason; the study continues."""


def study_name(params: Params, dataset_sha256: str) -> str:
    """`search.study_name`, or one derived from everything that changes the objective."""
    if params.search.study_name:
        return params.search.study_name
    s = params.search
    train = dataclasses.asdict(params.train)
    for key in ("lr", "batch_size", "weight_decay", "epochs", "nproc", "ddp_timeout_s"):
        train.pop(key)  # searched or replaced by search.epochs
    if not train["amp_cpu"]:  # added later: studies named before it keep their names
        train.pop("amp_cpu")
    recipe = {
        "dataset": dataset_sha256,
        "model": dataclasses.asdict(params.model),
        "train": train,
        "space": {k: v for k, v in dataclasses.asdict(s.space).items() if v is not None},
        "epochs": s.epochs,
        "min_epochs": s.min_epochs,
        "sampler": s.sampler,
        "pruner": s.pruner,
        "reduction_factor": s.reduction_factor,
        "seed": params.seed,
    }
    if s.cost is not None:  # a Pareto study: other directions, a measured second objective
        from pipeline.arch_cost import timing_provider

        recipe.update(
            objectives=list(s.objectives),
            latency_batch=s.latency_batch,
            latency_provider=timing_provider(params.device),  # CPU and GPU times never mix
        )
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    return f"{params.data.name}-{params.model.name.replace(':', '-')}-{digest}"


def make_storage(url: str):
    if url.startswith(("sqlite", "postgresql", "mysql")):
        engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=HEARTBEAT_INTERVAL_S,
                grace_period=GRACE_PERIOD_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=3
                ),
            )
    return optuna.storages.get_storage(url)


def open_storage(url: str, attempts: int = 5):
    """`make_storage(url)`, retried while another process creates Optuna's tables in the same
    new database (machines starting one study together: PostgreSQL answers the loser of that
    race with a unique violation, IntegrityError, or "already exists", ProgrammingError)."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(attempts):
        try:
            return make_storage(url)
        except (IntegrityError, ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))


def machine_id() -> str:
    """Which machine this is: `PIPELINE_MACHINE_ID` when set, else the host name and the
    project's folder (two working copies on one host are two machines). Recorded on every trial
    (`machine`), and a `search-worker`'s sampler identity (`sampler_host`)."""
    env = os.environ.get("PIPELINE_MACHINE_ID")
    return env or f"{socket.gethostname()}:{paths.project_root()}"


def sampler_host(joining: bool = False) -> str:
    """The machine identity in the sampler seed. The search stage's: `PIPELINE_MACHINE_ID`, or
    nothing, so a search draws the same trials in any folder (a fresh clone, a DVC `--temp`
    experiment); a machine joining the study (`search-worker`): `machine_id()`, so each draws
    its own start-up trials, different from the stage's."""
    if joining:
        return machine_id()
    return os.environ.get("PIPELINE_MACHINE_ID", "")


def sampler_seed(seed: int, worker: int, existing: int, host: str = "") -> int:
    """A 32-bit sampler seed from everything that must give different draws (hashed, so no
    two (seed, worker) pairs collide the way `seed * 1000 + worker` did); `host`: the machine's
    identity in the seed (`sampler_host`)."""
    key = json.dumps([seed, host, worker, existing])
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)


def startup_trials(n_trials: int) -> int:
    """TPE's random start-up trials: a sixth of the study, 3 to 10."""
    return max(3, min(10, n_trials // 6))


def make_sampler(
    params: Params, worker: int = 0, existing: int = 0, host: str = ""
) -> optuna.samplers.BaseSampler:
    seed = sampler_seed(params.seed, worker, existing, host)
    s = params.search
    if s.sampler == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed,
            multivariate=True,
            n_startup_trials=startup_trials(s.n_trials),
            constant_liar=True,
        )
    if s.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(
            seed=seed, population_size=max(4, startup_trials(s.n_trials))
        )
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.QMCSampler(seed=seed, scramble=True, warn_independent_sampling=False)


def make_pruner(params: Params) -> optuna.pruners.BasePruner:
    """Optuna's pruner; a Pareto study stops trials itself (`pipeline.pareto_study`)."""
    s = params.search
    if s.cost is not None:
        return optuna.pruners.NopPruner()
    if s.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=s.min_epochs, max_resource=s.epochs, reduction_factor=s.reduction_factor
        )
    if s.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=s.min_epochs, reduction_factor=s.reduction_factor
        )
    if s.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=s.min_epochs)
    return optuna.pruners.NopPruner()


def pruner_decides_at(params: Params) -> Callable[[int], bool]:
    """Whether `make_pruner(params)` can stop a trial after `epoch`: successive halving and
    Hyperband decide only at their rungs (min_epochs x reduction_factor^k), the median pruner
    after every epoch, `none` never. Asking elsewhere is a storage read for nothing."""
    s = params.search
    if s.pruner in ("successive_halving", "hyperband"):
        rungs, epoch = set(), s.min_epochs
        while epoch <= s.epochs:
            rungs.add(epoch)
            epoch *= s.reduction_factor
        return rungs.__contains__
    if s.pruner == "median":
        return lambda epoch: True
    return lambda epoch: False


def load_study(params: Params, name: str, worker: int = 0, joining: bool = False) -> optuna.Study:
    """Create or resume study `name`. The sampler's seed depends on the worker, on how many
    trials the study already holds and, for a machine `joining` the stage's study
    (`search-worker`), on the machine (`sampler_host`), so workers, resumed runs and machines
    do not repeat each other."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        url = paths.storage_url(params.search.storage)  # the project's studies/, not a copy
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///").split("?")[0]).parent.mkdir(
                parents=True, exist_ok=True
            )
        storage = open_storage(url)
        try:
            existing = len(
                storage.get_all_trials(storage.get_study_id_from_name(name), deepcopy=False)
            )
        except KeyError:  # a new study
            existing = 0
        return optuna.create_study(
            storage=storage,
            study_name=name,
            directions=["maximize"] if params.search.cost is None else ["maximize", "minimize"],
            sampler=make_sampler(params, worker, existing, sampler_host(joining)),
            pruner=make_pruner(params),
            load_if_exists=True,
        )
    except Exception as err:  # bad URL, unreachable server, missing driver
        if isinstance(err, optuna.exceptions.DuplicatedStudyError):
            raise
        raise ConfigError(
            f"search.storage: got {params.search.storage!r}; cannot open it "
            f"({type(err).__name__}: {str(err).splitlines()[0][:160]})"
        ) from None


def enqueue_current_params(study: optuna.Study, params: Params) -> bool:
    """A new study's first trial runs params.yaml's own lr / batch size / weight decay (and
    architecture, when it is searched) when they lie in the space, so the search starts from
    what the user has, never below it."""
    point = current_point(params)
    if study.trials or point is None:
        return False
    study.enqueue_trial(point, user_attrs={"source": "params.yaml"})
    return True


def counts(study: optuna.Study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    by_state = {state: 0 for state in TrialState}
    for t in trials:
        by_state[t.state] += 1
    return {
        "finished": by_state[TrialState.COMPLETE] + by_state[TrialState.PRUNED],
        "running": by_state[TrialState.RUNNING],
        "waiting": by_state[TrialState.WAITING],
    }


def _duplicate_of(trial: optuna.Trial) -> int | None:
    """For a params.yaml trial: the number of an earlier params.yaml trial, if there is one
    (each machine that starts a new study enqueues it; the first one enqueued runs)."""
    if trial.user_attrs.get("source") != "params.yaml":
        return None
    earlier = [
        t.number
        for t in trial.study.get_trials(deepcopy=False)
        if t.number < trial.number
        and t.user_attrs.get("source") == "params.yaml"
        and not is_skipped(t.user_attrs.get("fail_reason", ""))
        and not _died(t)  # its heartbeat retry (a copy, attributes included) must run
    ]
    return min(earlier, default=None)


def _died(t) -> bool:
    """A trial failed by the heartbeat (its process died): FAIL with no reason recorded."""
    return t.state == TrialState.FAIL and not t.user_attrs.get("fail_reason")


def _is_surplus(trial: optuna.Trial, n_trials: int) -> bool:
    """True when n_trials trials numbered before this one are finished or still running."""
    ahead = trial.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
    return sum(1 for t in ahead if t.number < trial.number) >= n_trials


def _retried_trial_number(trial: optuna.Trial) -> int | None:
    """The number of the dead trial this one re-runs (set by the heartbeat retry), if any."""
    for frozen in trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if frozen.number == trial.number:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(
                    frozen
                )
    return None


def make_objective(
    params: Params,
    data: DeviceData,
    parent_run_id: str | None,
    train_fn: Callable,
    worker: int = 0,
) -> Callable[[optuna.Trial], float | tuple[float, float]]:
    """The objective: one training run of the shared engine per trial (via `train_fn(trial
    params, on_epoch)`); val accuracy, and in a Pareto study also the architecture's cost."""
    pareto = params.search.cost is not None
    prunes_at = pruner_decides_at(params)

    def objective(trial: optuna.Trial) -> float | tuple[float, float]:
        if _is_surplus(trial, params.search.n_trials):
            trial.set_user_attr("fail_reason", "surplus")
            raise TrialFailed("surplus: the study already has search.n_trials trials")
        duplicate = _duplicate_of(trial)
        if duplicate is not None:
            trial.set_user_attr("fail_reason", f"duplicate: params.yaml trial {duplicate}")
            raise TrialFailed("duplicate: the params.yaml trial was enqueued twice")
        hp = suggest(trial, params)
        recipe = trial_params(params, hp)
        retried = _retried_trial_number(trial)
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("machine", machine_id())  # several machines: which one ran it
        trial.set_user_attr("device", str(data.device))
        cost_value, cost_numbers = None, {}
        if pareto:  # measured (or read from the study) before training: the rungs need it
            cost_value, cost_numbers = pareto_study.start_trial(trial, recipe, params, data.info)
        tags = {
            "trial_number": trial.number,
            "state": "RUNNING",
            "worker": worker,
            "study": trial.study.study_name,
            "device": str(data.device),
        }
        if retried is not None:
            tags["retry_of_trial"] = retried
        run = (
            ChildRun(params, parent_run_id, f"trial-{trial.number:03d}", tags)
            if parent_run_id
            else None
        )
        if run is not None:
            trial.set_user_attr("mlflow_run_id", run.run_id)
            run.log_params({**hp, "trial_number": trial.number})
            if pareto:
                run.log_metrics(cost_numbers, 0)
        start = time.perf_counter()

        epochs_run = 0
        curve: list[float] = []

        def on_epoch(epoch: int, metrics: dict) -> None:
            nonlocal epochs_run
            epochs_run = epoch
            if run is not None:
                run.log_metrics({k: metrics[k] for k in ("train_loss", "val_accuracy")}, epoch)
            if pareto:
                curve.append(metrics["val_accuracy"])
                if pareto_study.should_stop(trial, curve, cost_value, params):
                    raise optuna.TrialPruned(
                        f"stopped at epoch {epoch} (neither in the top 1/eta nor on the front)"
                    )
                return
            trial.report(metrics["val_accuracy"], epoch)
            if prunes_at(epoch) and trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch}")

        state, status, reason = "FAIL", "FAILED", ""
        try:
            result = train_fn(recipe, on_epoch)
            if result.status != "ok":
                reason = result.message
                raise TrialFailed(reason)
            state, status = "COMPLETE", "FINISHED"
            if run is not None:  # the value Optuna ranks by (the shipped, last-epoch model)
                run.log_metrics({"objective": result.val_accuracy}, epochs_run)
            if pareto:
                return result.val_accuracy, cost_value
            return result.val_accuracy
        except optuna.TrialPruned:
            state, status = "PRUNED", "KILLED"
            raise
        except torch.cuda.OutOfMemoryError:
            reason = f"out of GPU memory at batch_size={hp['batch_size']}"
            raise TrialFailed(reason) from None
        finally:
            seconds = round(time.perf_counter() - start, 3)
            trial.set_user_attr("seconds", seconds)
            trial.set_user_attr("epochs_run", epochs_run)
            if reason:
                trial.set_user_attr("fail_reason", reason)
            if run is not None:
                run.finish(status, {"state": state, "duration_s": seconds, "fail_reason": reason})

    return objective


def reconcile_stale_runs(params: Params, study: optuna.Study) -> int:
    """MLflow runs of trials failed by the heartbeat (their process died) end as FAILED.

    Those are the FAIL trials without a `fail_reason` (the objective records one, or closes
    the run as FAILED itself, for every failure it sees), whatever their run says: the process
    may have died after closing it as FINISHED or KILLED."""
    changed = 0
    tags = {"state": "FAIL", "fail_reason": "worker died (no heartbeat)"}
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = t.user_attrs.get("mlflow_run_id")
        if run_id and _died(t):
            changed += end_stale_run(params, run_id, tags)
    return changed


def _fail_stale_trials(study: optuna.Study) -> None:
    """Fail (and re-queue) trials whose worker stopped sending heartbeats (RDB storages)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def run_worker(
    study: optuna.Study,
    objective: Callable,
    n_trials: int,
    deadline: float | None,
    on_progress: Callable[[dict], None] | None = None,
) -> None:
    """Run trials until `n_trials` are finished (or the deadline passes)."""
    waited = False
    while True:
        _fail_stale_trials(study)
        c = counts(study)
        if on_progress is not None:
            on_progress(c)
        if c["finished"] >= n_trials or (deadline is not None and time.time() > deadline):
            return
        if c["finished"] + c["running"] >= n_trials and not c["waiting"]:
            if not waited:  # others' trials are running; some may still fail
                print(
                    f"search: waiting for {c['running']} running trial(s) of other workers "
                    f"(a dead worker's trial is retried after {GRACE_PERIOD_S} s)",
                    file=sys.stderr,
                )
                waited = True
            time.sleep(0.5)
            continue
        study.optimize(objective, n_trials=1, catch=(TrialFailed,))
