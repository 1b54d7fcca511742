"""Data-parallel training with torchrun: process group, rank helpers, the `train.nproc` launcher.

A stage runs data-parallel when torchrun started it (`RANK`, `WORLD_SIZE`, `LOCAL_RANK` in the
environment, `WORLD_SIZE` > 1): `process_group` joins the group (`gloo` on CPU, `nccl` on
CUDA, with `train.ddp_timeout_s` as the collective timeout, so a dead or stuck rank fails the
others instead of hanging them) and the engine (`pipeline.engine.fit`) wraps the model in
`DistributedDataParallel`. Without `WORLD_SIZE`, or with 1, none of this runs.

The rules the engine follows:
- `train.batch_size` is the GLOBAL batch: each of the N ranks takes `batch_size / N` images of
  every step (`per_rank_batch`; a batch size that N does not divide is a ConfigError). DDP
  averages the gradients over the ranks, so a step sees the same batch, and the same
  learning rate applies, as in one process.
- Every rank draws the same seeded permutation per epoch and takes its own disjoint slice of
  each global batch (`rank_slice`): together the ranks cover exactly the images one process
  would, step by step.
- Train loss and accuracy are all-reduced; rank 0's BatchNorm buffers are broadcast before
  validation, so every rank scores the same model and stops on the same epoch.
- Rank 0 alone writes checkpoints, metrics, plots and the MLflow run (`is_main`).

`launch(nproc, module, ...)` is what `train.nproc: N` does: it runs `module` under torchrun's
launcher (`torch.distributed.run`, standalone rendezvous on this machine), torchrun's own log
going to `logs/torchrun-<stage>.log`, and turns a failed rank into one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import ConfigError, StageFailed, one_line


def launched() -> bool:
    """True in a process torchrun (or another launcher setting `WORLD_SIZE`) started."""
    return "WORLD_SIZE" in os.environ


def world_size() -> int:
    """Processes in this job (torchrun's `WORLD_SIZE`; 1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank in the group (torchrun's `RANK`; 0 when not launched by it)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's index on its machine (which GPU it takes)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True in the process that writes files and MLflow (rank 0, or the only process)."""
    return rank() == 0


def active_world_size() -> int:
    """The size of the initialised process group; 1 when there is none."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def per_rank_batch(batch_size: int, world: int, key: str = "train.batch_size") -> int:
    """Images per rank and step for the global `batch_size` split over `world` ranks."""
    if batch_size % world:
        raise ConfigError(
            f"{key}: got {batch_size}; expected a multiple of the {world} training processes "
            f"(it is the global batch, split evenly over the ranks)"
        )
    return batch_size // world


def rank_slice(rank_index: int, per_rank: int) -> slice:
    """The positions of a global batch that rank `rank_index` trains on."""
    return slice(rank_index * per_rank, (rank_index + 1) * per_rank)


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` in DistributedDataParallel (gradients all-reduced); rank 0's weights are
    broadcast to every rank here."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else 0] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks, in place; returned for chaining."""
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
    for buffer in model.buffers():
        torch.distributed.broadcast(buffer, src=0)


def _terminated(signum, frame):
    """torchrun stops the surviving ranks with SIGTERM when one fails, and reports that one
    itself: exit quietly, through the `with` blocks (rank 0's MLflow run ends FAILED).

    A rank already on its way out (its collective saw the dead peer first, so an exception is
    being handled: a `with` block is closing the MLflow run) lets that finish: a SystemExit
    raised inside MLflow's end_run would leave the run RUNNING."""
    if sys.exc_info()[1] is not None:
        return
    raise SystemExit(128 + signum)


# Words in the RuntimeError a collective raises when a peer is gone (gloo raises plain
# RuntimeError on a closed connection or a timeout; NCCL and c10d raise DistError)
_PEER_FAILURE_WORDS = (
    "gloo",
    "nccl",
    "c10d",
    "connection closed",
    "connection reset",
    "timed out",
)


def is_peer_failure(err: BaseException) -> bool:
    """True for the error of a collective whose peers died or did not answer in time."""
    text = str(err).lower()
    return isinstance(err, torch.distributed.DistError) or (
        isinstance(err, RuntimeError) and any(word in text for word in _PEER_FAILURE_WORDS)
    )


@contextlib.contextmanager
def process_group(device: torch.device, timeout_s: float, stage: str) -> Iterator[None]:
    """Join torchrun's process group for the body (nothing when `WORLD_SIZE` is absent or 1).

    A rank that loses its peers (one died, or none answered within `timeout_s`) raises
    StageFailed naming itself. SIGTERM (torchrun stopping the survivors of a failed rank)
    exits quietly through the `with` blocks, so rank 0 ends its MLflow run as FAILED."""
    if world_size() <= 1:
        yield
        return
    dist = torch.distributed
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    previous = signal.signal(signal.SIGTERM, _terminated)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        timeout=timedelta(seconds=timeout_s),
        device_id=device if cuda else None,
    )
    try:
        yield
    except RuntimeError as err:
        if not is_peer_failure(err):
            raise
        raise StageFailed(
            f"{stage}: rank {rank()} of {world_size()} lost its peers (a rank died, or none "
            f"answered within train.ddp_timeout_s={timeout_s:g}s): {one_line(err, 160)}"
        ) from None
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        signal.signal(signal.SIGTERM, previous)


def launch(
    nproc: int, module: str, stage: str, device: torch.device, args: tuple[str, ...] = ()
) -> None:
    """Run `python -m module *args` in `nproc` processes under torchrun's launcher on this
    machine and wait; a failed rank raises StageFailed naming it (exit code 2 of a rank, a user
    error it has printed already, exits 2). On CUDA each process takes its own GPU."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise ConfigError(
            f"train.nproc: got {nproc}; this machine has {torch.cuda.device_count()} GPUs "
            f"(one process per GPU)"
        )
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun's default is 1 thread per process
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // nproc))
    log = Path("logs") / f"torchrun-{stage}.log"
    launcher = ["--standalone", "--nproc-per-node", str(nproc), "--max-restarts", "0"]
    with _agent_log(log):
        try:
            run(parse_args([*launcher, "-m", module, *args]))
        except ChildFailedError as err:
            first_rank, failure = err.get_first_failure()
            if failure.exitcode == 2:
                raise SystemExit(2) from None
            how = (
                f"was killed by {failure.signal_name()}"
                if failure.exitcode < 0
                else f"exited with code {failure.exitcode}"
            )
            raise StageFailed(
                f"{stage}: rank {first_rank} of {nproc} {how}; torchrun stopped the others "
                f"(agent log: {log})"
            ) from None
        except SignalException as err:  # the launcher itself was stopped (SIGTERM, SIGHUP)
            raise StageFailed(
                f"{stage}: stopped by {signal.Signals(err.sigval).name}; torchrun stopped every "
                f"rank"
            ) from None


@contextlib.contextmanager
def _agent_log(path: Path) -> Iterator[None]:
    """Send torchrun's agent messages (rendezvous, worker exits) to `path`, not the console."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("torch.distributed")  # torch gives it a stderr handler
    saved = logger.handlers[:], logger.propagate
    logger.handlers, logger.propagate = [handler], False
    try:
        yield
    finally:
        logger.handlers, logger.propagate = saved
        handler.close()
