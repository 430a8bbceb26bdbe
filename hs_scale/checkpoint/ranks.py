"""Where a rank stands (global rank, tp/pp/dp coordinates, TP device mesh) and the two collectives the
checkpoint manager needs on top of DCP's own (a barrier, an "any rank?" flag all-reduce, and a JSON broadcast from
rank 0 carried in a uint8 tensor, so no pickle travels between ranks either)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hs_scale.checkpoint import state


@dataclass
class Coords:
    rank: int
    world: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    tp_group: Any = None

    def layout(self) -> dict:
        return {"world": self.world, "tp": self.tp_size, "pp": self.pp_size, "dp": self.dp_size}


def coords(groups) -> Coords:
    if not (dist.is_available() and dist.is_initialized()):
        return Coords(0, 1, 0, 1, 0, 1, 0, 1)
    rank, world = dist.get_rank(), dist.get_world_size()
    if groups is None:
        ps = sys.modules.get("megatron.core.parallel_state")
        if ps is not None and ps.model_parallel_is_initialized():
            from hs_scale.parallel.layout import current_groups

            groups = current_groups()
        else:  # plain data parallelism over the whole world
            return Coords(rank, world, 0, 1, 0, 1, rank, world)
    g = groups
    return Coords(rank, world, g.tp_rank, g.tp_size, g.pp_rank, g.pp_size, g.dp_rank, g.dp_size, g.tp)


_MESHES: dict[int, Any] = {}


def tp_context(c: Coords, model: nn.Module) -> state.TPContext:
    if c.tp_size == 1:
        return state.TPContext()
    key = id(c.tp_group)
    if key not in _MESHES:
        from torch.distributed.device_mesh import DeviceMesh

        device = next(state.modules_of(model)[0].parameters()).device.type
        _MESHES[key] = DeviceMesh.from_group(c.tp_group, device)
    return state.TPContext(c.tp_rank, c.tp_size, _MESHES[key])


def bcast_json(obj: Any, c: Coords) -> Any:
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


def any_rank(flag: bool, c: Coords) -> bool:
    """True on every rank if `flag` is true on any rank (an all-reduce MAX of one integer)."""
    if c.world == 1:
        return bool(flag)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(bool(flag))], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(c: Coords) -> None:
    if c.world > 1:
        dist.barrier()
