"""The pure parts of data-parallel training: the global batch split over ranks, the config
rule, which errors count as a lost peer. The real two-process runs are in tests/e2e/test_ddp.py."""

import pytest
import torch

from pipeline import distributed
from pipeline.config import parse_params
from pipeline.errors import ConfigError


def _rank_indices(order, batch_size, world, rank):
    """What `fit` hands rank `rank` over one epoch of `order` (the shared permutation)."""
    per_rank = distributed.per_rank_batch(batch_size, world)
    shard = distributed.rank_slice(rank, per_rank)
    steps = len(order) // batch_size
    return [order[s * batch_size : (s + 1) * batch_size][shard] for s in range(steps)]


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_ranks_cover_each_global_batch_exactly_once(world):
    n, batch_size = 1000, 64
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    per_rank = [_rank_indices(order, batch_size, world, r) for r in range(world)]
    steps = n // batch_size
    for step in range(steps):
        taken = torch.cat([per_rank[r][step] for r in range(world)])
        # the ranks together train on exactly one process's batch of this step, no image twice
        assert sorted(taken.tolist()) == sorted(order[step * 64 : (step + 1) * 64].tolist())
        assert all(len(per_rank[r][step]) == batch_size // world for r in range(world))
    everything = torch.cat([torch.cat(p) for p in per_rank])
    assert len(everything) == len(set(everything.tolist())) == steps * batch_size


def test_per_rank_batch_is_the_global_batch_divided_by_the_ranks():
    assert distributed.per_rank_batch(64, 1) == 64
    assert distributed.per_rank_batch(64, 2) == 32
    assert distributed.per_rank_batch(96, 3) == 32
    assert distributed.rank_slice(2, 32) == slice(64, 96)


def test_a_batch_the_ranks_cannot_share_is_a_one_line_config_error():
    with pytest.raises(ConfigError) as err:
        distributed.per_rank_batch(30, 4)
    message = str(err.value)
    assert message.startswith("train.batch_size: got 30;") and "4" in message
    assert "\n" not in message


def test_params_refuse_a_batch_size_train_nproc_does_not_divide():
    with pytest.raises(ConfigError) as err:
        parse_params({"train": {"batch_size": 64, "nproc": 3}})
    assert str(err.value).startswith("train.batch_size: got 64; expected a multiple of ")
    assert "train.nproc (3)" in str(err.value)
    space = {"space": {"batch_size": [48, 96]}}  # the search's choices too (next test)
    assert (
        parse_params({"train": {"batch_size": 96, "nproc": 3}, "search": space}).train.nproc == 3
    )
    with pytest.raises(ConfigError, match=r"^train.ddp_timeout_s: got 0;"):
        parse_params({"train": {"ddp_timeout_s": 0}})


def test_params_refuse_search_batch_sizes_the_retrain_cannot_split_over_train_nproc():
    space = {"batch_size": [32, 48, 63]}
    with pytest.raises(ConfigError) as err:
        parse_params({"train": {"nproc": 2}, "search": {"space": space}})
    assert str(err.value).startswith(
        "search.space.batch_size: got [32, 48, 63]; with train.nproc 2"
    )
    assert "([63] is not)" in str(err.value)
    assert parse_params({"search": {"space": space}}).train.nproc == 1  # one process: any batch
    assert parse_params({"train": {"nproc": 2}, "search": {"space": {"batch_size": [32, 48]}}})


def test_without_torchrun_there_is_one_process_and_no_group(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert not distributed.launched()
    assert (distributed.world_size(), distributed.rank(), distributed.local_rank()) == (1, 0, 0)
    assert distributed.is_main() and distributed.active_world_size() == 1
    with distributed.process_group(torch.device("cpu"), 5, "train"):  # a no-op
        assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert distributed.launched() and not distributed.is_main()


def test_only_collective_failures_count_as_a_lost_peer():
    gloo = RuntimeError(
        "[third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:1: "
        "Connection reset by peer"
    )
    assert distributed.is_peer_failure(gloo)
    assert distributed.is_peer_failure(torch.distributed.DistBackendError("NCCL watchdog"))
    shape_bug = RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 2x2)")
    assert not distributed.is_peer_failure(shape_bug)
    assert not distributed.is_peer_failure(ValueError("gloo"))


def _sigterm_self_during(seconds: float) -> None:
    """Send this process SIGTERM, then spend `seconds` in Python (where handlers run)."""
    import os
    import signal
    import time

    os.kill(os.getpid(), signal.SIGTERM)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.001)


class _Closing:
    """A `with` block whose exit takes a while and is hit by SIGTERM (MLflow's end_run)."""

    def __init__(self):
        self.closed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _sigterm_self_during(0.05)
        self.closed = True


def test_sigterm_exits_quietly_but_never_interrupts_a_with_block_closing_on_an_error():
    """torchrun's SIGTERM to the survivors: SystemExit when the rank is working; ignored when it
    is already closing its `with` blocks on an error (the peer's death reached it first), so
    rank 0's MLflow run is ended, not left RUNNING by a SystemExit inside end_run."""
    import signal

    previous = signal.signal(signal.SIGTERM, distributed._terminated)
    try:
        with pytest.raises(SystemExit) as stopped:
            _sigterm_self_during(1.0)
        assert stopped.value.code == 128 + signal.SIGTERM

        closing = _Closing()
        with pytest.raises(RuntimeError, match="Connection closed by peer"):
            with closing:
                raise RuntimeError("[gloo] Connection closed by peer")
        assert closing.closed  # the exit ran to its end
    finally:
        signal.signal(signal.SIGTERM, previous)
