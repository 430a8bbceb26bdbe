"""Distributed, reshardable, atomic checkpoints (torch.distributed.checkpoint + DTensor over the TP group).

    manager.py  CheckpointManager (save / load_latest / list_checkpoints / verify), load_full_model_state
    ranks.py    rank coordinates, TP device mesh, barrier + JSON broadcast (no pickle between ranks)
    state.py    model / optimizer / RNG state <-> layout-free DCP keys (names, global layer indices, TP shards)
    safe_io.py  pickle-free reading (allow-listed DCP metadata, JSON + safetensors trees), durable writes

The trainer meets this package only through CheckpointManager and load_full_model_state.
"""

from hs_scale.checkpoint.manager import (
    CheckpointCorruptError,
    CheckpointInfo,
    CheckpointManager,
    load_full_model_state,
)
from hs_scale.checkpoint.safe_io import UnsafeCheckpointError

__all__ = [
    "CheckpointCorruptError",
    "CheckpointInfo",
    "CheckpointManager",
    "UnsafeCheckpointError",
    "load_full_model_state",
]
