"""search-worker: one more machine on the search stage's study (no DVC stage, no retrain).

Reads: params.yaml (the same as the first machine's: the study's name is derived from it, see
`pipeline.study.study_name`), `data/prepared/` when present (else the dataset is prepared in
memory, as the prepare stage would). Writes: nothing but trials of the study in
`search.storage` (a database every machine reaches, e.g. PostgreSQL) and their MLflow runs,
nested under the search run the first machine's stage started (`MLFLOW_TRACKING_URI`: a
tracking server every machine reaches).

Start the search stage (`dvc repro`) on the first machine and this command on the others, in
any order: it waits up to --wait-s seconds for the study (and its search run) to exist, runs
trials with `search.workers` processes until the study holds `search.n_trials` finished trials
(or `search.timeout_s` passes), then exits; the first machine's stage ships the best trial.
Each machine draws its own start-up trials (`PIPELINE_MACHINE_ID`, else the host name and the
project's folder, seeds its samplers; the stage's seed has no folder in it). A machine that
dies mid-trial: after the heartbeat's grace period another machine fails its trial, re-runs it
with the same params, and its MLflow run ends FAILED.

    pipeline search-worker [--wait-s SECONDS]     (or python -m pipeline.search_worker)
"""

from __future__ import annotations

import argparse
import sys
import time

import optuna
import torch

from pipeline import paths
from pipeline.config import Params, load_params, parse_params
from pipeline.data import DeviceData, prepare
from pipeline.engine import resolve_device
from pipeline.errors import ConfigError, UserError, cli_entry
from pipeline.search_study import TrialTrainer, _worker_threads, extra_workers
from pipeline.study import (
    FINISHED,
    enqueue_current_params,
    load_study,
    machine_id,
    make_objective,
    open_storage,
    reconcile_stale_runs,
    run_worker,
    study_name,
)
from pipeline.tracking import check_tracking
from pipeline.train import load_device_data

PARENT_ATTR = "mlflow_parent_run_id"  # set on the study by the search stage (search_study)


def worker_data(params: Params, index: int = 0) -> DeviceData:
    """`data/prepared/` on this process's device, or the same splits prepared in memory."""
    if paths.DATASET_JSON.is_file():
        return load_device_data(params, index)
    return DeviceData(prepare(params.data, params.seed), resolve_device(params.device))


def shown_url(url: str) -> str:
    """A storage URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL (Optuna's journal, redis)
        return url


def wait_for_study(params: Params, name: str, wait_s: float, poll_s: float = 1.0) -> str | None:
    """Block until study `name` exists in `search.storage` and, with tracking on, holds the
    search run's id (set by the first machine's stage); returns that id (None: tracking off).
    UserError after `wait_s` seconds."""
    url = paths.storage_url(params.search.storage)
    try:
        storage = open_storage(url)
    except Exception as err:
        raise ConfigError(
            f"search.storage: got {shown_url(url)!r}; cannot open it ({type(err).__name__})"
        ) from None
    deadline = time.monotonic() + wait_s
    announced = False
    while True:
        try:
            attrs = storage.get_study_user_attrs(storage.get_study_id_from_name(name))
        except KeyError:  # not created yet
            attrs = None
        if attrs is not None and (not params.tracking.enabled or attrs.get(PARENT_ATTR)):
            return attrs.get(PARENT_ATTR) if params.tracking.enabled else None
        if time.monotonic() >= deadline:
            what = "no study" if attrs is None else "no search run recorded in study"
            raise UserError(
                f"search.storage: {what} {name!r} in {shown_url(url)} after {wait_s:g} s; start "
                f"the search stage (`dvc repro`) on the first machine, with the same "
                f"params.yaml, then this command"
            )
        if not announced:
            print(
                f"search-worker: waiting up to {wait_s:g} s for study {name!r} in "
                f"{shown_url(url)} (started by `dvc repro` on the first machine)",
                file=sys.stderr,
            )
            announced = True
        time.sleep(poll_s)


def work(
    params: Params,
    name: str,
    parent_run_id: str | None,
    index: int,
    deadline: float | None,
    on_progress=None,
    data: DeviceData | None = None,
) -> optuna.Study:
    """One worker process of this machine: its sampler seed, its trials, until n_trials."""
    torch.set_num_threads(_worker_threads(params.search.workers))
    data = data or worker_data(params, index)
    study = load_study(params, name, worker=index, joining=True)
    if index == 0:  # once per machine; a second copy in the study ends as `duplicate`
        enqueue_current_params(study, params)
    trainer = TrialTrainer(params, data, keep=False)  # this machine ships no model
    objective = make_objective(params, data, parent_run_id, trainer, index)
    run_worker(study, objective, params.search.n_trials, deadline, on_progress)
    return study


def _process(raw_params: dict, name: str, parent_run_id, index: int, deadline) -> None:
    """Entry point of this machine's extra worker processes (spawned)."""
    work(parse_params(raw_params), name, parent_run_id, index, deadline)


def run(params: Params, wait_s: float = 600.0) -> dict:
    """Join the study named by `params` (waiting for it), run trials until it holds
    `search.n_trials` finished trials; returns this machine's counts."""
    s = params.search
    data = worker_data(params)
    name = study_name(params, data.info["sha256"]["all"])
    parent_run_id = wait_for_study(params, name, wait_s)
    deadline = time.time() + s.timeout_s if s.timeout_s else None
    shown = {"finished": -1}

    def on_progress(c: dict) -> None:
        if c["finished"] != shown["finished"]:
            print(f"search-worker: {c['finished']}/{s.n_trials} trials finished", file=sys.stderr)
            shown["finished"] = c["finished"]

    with extra_workers(_process, params, name, parent_run_id, deadline):
        study = work(params, name, parent_run_id, 0, deadline, on_progress, data)
    reconcile_stale_runs(params, study)
    here = [
        t
        for t in study.get_trials(deepcopy=False, states=FINISHED)
        if t.user_attrs.get("machine") == machine_id()
    ]
    return {"study_name": name, "trials_run_here": len(here)}


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="pipeline search-worker",
        description=__doc__,
        epilog="Hyperparameters are never flags: the study's params come from params.yaml.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--wait-s",
        type=float,
        default=600.0,
        help="how long to wait for the first machine to create the study (default 600)",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    params = load_params(paths.PARAMS)
    check_tracking(params)  # an unreachable tracking server stops us before any work
    outcome = run(params, args.wait_s)
    print(
        f"search-worker: study {outcome['study_name']} done; "
        f"{outcome['trials_run_here']} finished trial(s) ran on this machine ({machine_id()})",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
