"""Distributed, reshardable, atomic checkpoints (torch.distributed.checkpoint + DTensor over the TP group).

    manager.py  CheckpointManager (save / load_latest / list_checkpoints / verify), load_full_model_state,
                verify_checkpoint / require_verified (what every read path checks first)
    lock.py     OutputDirLock: one run per output directory, stale locks of dead processes detected safely
    ranks.py    rank coordinates, TP device mesh, barrier, any-rank flag + JSON broadcast (no pickle between ranks)
    state.py    model / optimizer / RNG state <-> layout-free DCP keys (names, global layer indices, TP shards)
    safe_io.py  pickle-free reading (allow-listed DCP metadata, JSON + safetensors trees), durable writes

The trainer meets this package through CheckpointManager, load_full_model_state and OutputDirLock.
"""

from hs_scale.checkpoint.manager import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointInfo,
    CheckpointManager,
    CheckpointSaveError,
    is_step_folder,
    load_full_model_state,
    require_verified,
    verify_checkpoint,
)
from hs_scale.checkpoint.safe_io import UnsafeCheckpointError

__all__ = [
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointSaveError",
    "is_step_folder",
    "require_verified",
    "verify_checkpoint",
    "CheckpointInfo",
    "CheckpointManager",
    "UnsafeCheckpointError",
    "load_full_model_state",
]
