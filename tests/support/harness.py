"""Run a function on N local CPU ranks over gloo: the multi-process harness of the distributed tests.

    results = run_distributed(check_tp_attention, world_size=2, args=(cfg,), timeout_s=120)

Every rank is a fresh `spawn`ed process (no state inherited from the test process), joins a gloo process group
on a free localhost port, is seeded with the same `seed` (ranks that must differ derive it from their rank),
gets the CPU shim (unless cpu_shim=False), runs `fn(rank, world_size, *args)` and sends back what it returns
(pickled; keep it small).

Bounded everywhere, so a deadlock fails a test instead of blocking CI: the parent waits at most `timeout_s` for
all ranks, then kills the stragglers and raises `TimeoutError` naming them; the gloo group itself gets the same
timeout, so a rank stuck in a collective raises on its own. The first rank that raises makes `run_distributed`
kill the others and re-raise with that rank's traceback.

NOTE: `fn` is loaded in the child from its source file (not by module name), so worker functions defined at the
top level of a pytest file work whatever pytest's import mode is.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import pickle
import queue
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.multiprocessing as mp

from hs_scale.seeding import seed_everything


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_function(path: str, qualname: str) -> Callable:
    name = f"_hs_scale_dist_worker_{abs(hash(path))}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    obj: Any = sys.modules[name]
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _child(
    rank: int,
    world_size: int,
    port: int,
    path: str,
    qualname: str,
    args: tuple,
    seed: int,
    timeout_s: float,
    threads: int,
    shim: bool,
    results: Any,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(threads)
    try:
        import torch.distributed as dist

        dist.init_process_group(
            "gloo",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
            init_method=f"tcp://127.0.0.1:{port}",
        )
        if shim:  # imports megatron-core (~3 s per rank): skipped for workers that do not use it
            from hs_scale.parallel.cpu_shim import apply_cpu_shim

            apply_cpu_shim()
        seed_everything(seed)
        out = _load_function(path, qualname)(rank, world_size, *args)
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException:  # noqa: B036 - report everything, including SystemExit from pytest helpers
        results.put((rank, "error", traceback.format_exc()))
    finally:
        _teardown()


def _teardown() -> None:
    ps = sys.modules.get("megatron.core.parallel_state")  # only if the worker used megatron (no import cost)
    if ps is not None and ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    timeout_s: float = 120.0,
    seed: int = 1234,
    cpu_shim: bool = True,
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` spawned gloo ranks; return the per-rank results.

    fn: a top-level function (it is re-imported from its file in every rank).
    cpu_shim: apply hs_scale.parallel.cpu_shim in every rank before fn (a no-op on CUDA machines).
    Raises RuntimeError with the failing rank's traceback, or TimeoutError naming the ranks that hung.
    """
    path, qualname = inspect.getfile(fn), fn.__qualname__
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    port = free_port()
    procs = [
        ctx.Process(
            target=_child,
            args=(rank, world_size, port, path, qualname, tuple(args), seed, timeout_s, threads, cpu_shim, results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(out))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout_s:.0f}s (hang or deadlock)")
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in out]
                if dead:
                    time.sleep(0.5)  # a rank that just reported may still be in the queue's pipe
                    if results.empty():
                        raise RuntimeError(
                            f"ranks {dead} exited (codes {[procs[r].exitcode for r in dead]}) "
                            "without reporting a result"
                        ) from None
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{payload}")
            out[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=5 if len(out) == world_size else 0.1)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        results.close()
    return [out[r] for r in range(world_size)]
