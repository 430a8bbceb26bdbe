"""The gloo multi-process harness: results come back per rank, failures carry the rank's traceback, hangs time out."""

from __future__ import annotations

import time

import pytest
import torch
from support.harness import free_port, run_distributed

pytestmark = pytest.mark.slow


def _sum_ranks(rank: int, world_size: int, scale: int) -> dict:
    import torch.distributed as dist

    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return {"sum": t.item() * scale, "rand": torch.rand(2), "env_rank": int(__import__("os").environ["RANK"])}


def _fail_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom on purpose")


def _hang_on_rank_zero(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    if rank == 0:
        dist.barrier()  # rank 1 never joins
    else:
        time.sleep(60)


def test_results_per_rank_and_seeding():
    res = run_distributed(_sum_ranks, 2, args=(10,), timeout_s=60, seed=5, cpu_shim=False)
    assert [r["sum"] for r in res] == [30.0, 30.0]
    assert [r["env_rank"] for r in res] == [0, 1]
    torch.manual_seed(5)
    expected = torch.rand(2)
    assert all(torch.equal(r["rand"], expected) for r in res), "every rank is seeded with the same seed"


def test_failure_reports_rank_and_traceback():
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 of 2 failed.*ValueError: boom on purpose"):
        run_distributed(_fail_on_rank_one, 2, timeout_s=60, cpu_shim=False)


def test_hang_fails_within_the_timeout():
    start = time.monotonic()
    with pytest.raises((TimeoutError, RuntimeError)):
        run_distributed(_hang_on_rank_zero, 2, timeout_s=10, cpu_shim=False)
    assert time.monotonic() - start < 40


def test_free_port_is_bindable():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))
