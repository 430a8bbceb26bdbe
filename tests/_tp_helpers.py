"""Test helpers for tensor-parallel models: gather a shard to full shape, and the collectives a TP step needs.
(Used by tests/parallel and tests/checkpoint; moved out of hs_scale.parallel.tp_model, which only tests used.)"""

from __future__ import annotations

import torch


def expected_tp_collectives(encoder_layers: int, decoder_layers: int) -> dict[str, int]:
    """All-reduces on the TP group for one forward and one backward of a parallelize_tensor'd encoder-decoder."""
    attention = encoder_layers + 2 * decoder_layers  # encoder self, decoder self, cross
    ffn = encoder_layers + decoder_layers
    return {"forward": attention + ffn, "backward": attention + decoder_layers + ffn}


def gather_tp_tensor(t: torch.Tensor, param: torch.Tensor, group) -> torch.Tensor:
    """Full-shape version of `t` (a TP-sharded param or its grad), concatenated along the param's partition dim."""
    import torch.distributed as dist

    if not getattr(param, "tensor_model_parallel", False) or dist.get_world_size(group) == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=param.partition_dim)
