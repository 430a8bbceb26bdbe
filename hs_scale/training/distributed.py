"""Process-group setup shared by every launch path (torchrun, DeepSpeed launcher, srun, Ray Train).

All of them end here: the launcher exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (Ray Train
initialises the group itself), and `init_distributed` joins that world or, with none, runs a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str = "auto", timeout_minutes: int = 30) -> DistEnv:
    """Join the launcher's world (gloo on CPU, nccl on GPU) or return a single-process environment."""
    use_cuda = torch.cuda.is_available() if device_name == "auto" else device_name == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", init_method="env://", timeout=timedelta(minutes=timeout_minutes)
        )
    if not dist.is_initialized():
        return DistEnv(rank=0, world_size=1, local_rank=0, device=device)
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)
