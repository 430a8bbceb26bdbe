"""Where a rank stands (`hs_scale.parallel.layout.ParallelGroups`, passed explicitly; its TP device mesh) and the
collectives the checkpoint manager needs on top of DCP's own (a barrier, an "any rank?" flag all-reduce, and a JSON
broadcast from rank 0 carried in a uint8 tensor, so no pickle travels between ranks either)."""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hs_scale.checkpoint import state
from hs_scale.parallel.layout import ParallelGroups

# NOTE: the name the checkpoint manager and the trainer annotate with; the one type is ParallelGroups.
Coords = ParallelGroups


def coords(groups: ParallelGroups | None) -> ParallelGroups:
    """`groups`, or plain data parallelism over the world when None (one process when torch.distributed is not
    up). Tensor/pipeline-parallel callers pass their groups: nothing here reads megatron's global state."""
    return groups if groups is not None else ParallelGroups.data_parallel()


_MESHES: dict[int, Any] = {}


def tp_context(c: ParallelGroups, model: nn.Module) -> state.TPContext:
    if c.tp_size == 1:
        return state.TPContext()
    key = id(c.tp)
    if key not in _MESHES:
        from torch.distributed.device_mesh import DeviceMesh

        device = next(state.modules_of(model)[0].parameters()).device.type
        _MESHES[key] = DeviceMesh.from_group(c.tp, device)
    return state.TPContext(c.tp_rank, c.tp_size, _MESHES[key])


def bcast_json(obj: Any, c: ParallelGroups) -> Any:
    """Rank 0's JSON-able `obj` on every rank (bytes in a tensor: no pickle between ranks either)."""
    if c.world == 1:
        return obj
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    data = json.dumps(obj).encode() if c.rank == 0 else b""
    n = torch.tensor([len(data)], dtype=torch.long, device=device)
    dist.broadcast(n, 0)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if c.rank == 0 else None
    if buf is None:
        buf = torch.empty(int(n), dtype=torch.uint8, device=device)
    dist.broadcast(buf, 0)
    return json.loads(bytes(buf.cpu().tolist()).decode())


def any_rank(flag: bool, c: ParallelGroups) -> bool:
    """True on every rank if `flag` is true on any rank (an all-reduce MAX of one integer)."""
    if c.world == 1:
        return bool(flag)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(bool(flag))], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(c: ParallelGroups) -> None:
    if c.world > 1:
        dist.barrier()
