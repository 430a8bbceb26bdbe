"""Count the collectives a step issues, to compare them with what the parallel layout needs.

    with CollectiveCounter() as counts:
        loss = step()
    assert counts.total("all_reduce") == 2 * num_layers

Every torch.distributed collective and p2p call is wrapped while the context is open (plus megatron-core's
import-time aliases of all-gather / reduce-scatter and DeepSpeed's backend-bound ones, which would otherwise
bypass the wrapper). Calls on a group
of one rank are counted separately (`trivial`): megatron skips most of them, and they cost nothing.
"""

from __future__ import annotations

import collections
import functools
import importlib
import sys

import torch.distributed as dist

OPS = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "all_gather_object",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "send",
    "recv",
    "isend",
    "irecv",
)
# NOTE: batch_isend_irecv is not counted itself: each of its P2POps runs through the (wrapped) isend/irecv, so a
# batch shows up as its isend/irecv calls. The wrappers are also installed as distributed_c10d's module globals,
# because P2POp checks `op in [isend, irecv]` by identity against those.
_P2P = ("isend", "irecv")
# Module-level aliases bound at import time: (module, attribute) -> canonical op name.
_ALIASES = {
    ("megatron.core.tensor_parallel.mappings", "dist_all_gather_func"): "all_gather_into_tensor",
    ("megatron.core.tensor_parallel.mappings", "dist_reduce_scatter_func"): "reduce_scatter_tensor",
}


def _group_of(name: str, args: tuple, kwargs: dict):
    """The process group a call runs on (None = the default world group)."""
    if kwargs.get("group") is not None:
        return kwargs["group"]
    return next((a for a in args if isinstance(a, dist.ProcessGroup)), None)


class CollectiveCounter:
    """Context manager; `counts[(op, group_size)]` after it closes (also readable while open)."""

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.trivial: collections.Counter = collections.Counter()
        self._saved: list[tuple[object, str, object]] = []

    def _wrap(self, name: str, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            size = dist.get_world_size(_group_of(name, args, kwargs))
            (self.counts if size > 1 else self.trivial)[(name, size)] += 1
            return fn(*args, **kwargs)

        return counted

    def __enter__(self) -> CollectiveCounter:
        for name in OPS:
            if hasattr(dist, name):
                self._patch(dist, name, name)
        c10d = importlib.import_module("torch.distributed.distributed_c10d")
        for name in _P2P:
            self._saved.append((c10d, name, getattr(c10d, name)))
            setattr(c10d, name, getattr(dist, name))  # the same wrapper object as dist.<name>
        # DeepSpeed's torch backend binds all-gather / reduce-scatter functions when it is initialised.
        ds_comm = importlib.import_module("deepspeed.comm.comm") if "deepspeed.comm.comm" in sys.modules else None
        cdb = getattr(ds_comm, "cdb", None)
        for attr, name in (
            ("all_gather_function", "all_gather_into_tensor"),
            ("reduce_scatter_function", "reduce_scatter_tensor"),
        ):
            if getattr(cdb, attr, None) is not None:
                self._patch(cdb, attr, name)
        for (module, attr), name in _ALIASES.items():
            try:
                mod = importlib.import_module(module)
            except ImportError:
                continue
            if hasattr(mod, attr):
                self._patch(mod, attr, name)
        return self

    def _patch(self, owner, attr: str, name: str) -> None:
        original = getattr(owner, attr)
        self._saved.append((owner, attr, original))
        setattr(owner, attr, self._wrap(name, original))

    def __exit__(self, *exc) -> None:
        for owner, attr, original in reversed(self._saved):
            setattr(owner, attr, original)
        self._saved.clear()

    def total(self, op: str | None = None) -> int:
        """Non-trivial calls of `op` (all ops when None)."""
        return sum(n for (name, _), n in self.counts.items() if op is None or name == op)

    def summary(self) -> dict[str, int]:
        return {f"{name}@{size}": n for (name, size), n in sorted(self.counts.items())}
