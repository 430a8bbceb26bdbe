"""Apply tensor parallelism to a built encoder-decoder from the outside (torchtitan style: the model code is
written for one device; this swaps its modules for TP shards, in place).

    model = build_model(model_cfg, selection_cfg, num_tasks)   # same seed on every rank
    parallelize_tensor(model, groups)                           # this rank's shards

Swaps (t = TP size; each swap copies the rank's shard of the dense weights, so the TP model computes exactly
what the dense one did):
  * every SelectedHeadAttention -> TPSelectedHeadAttention (pool heads / slots split, see tp_attention.py)
  * every selector (phi [K, L, H']) -> TPHeadSelector (phi [K, L, H'/t]; selection stays local)
  * every FFN fc1 -> ColumnParallelLinear (F/t outputs), fc2 -> RowParallelLinear (F/t inputs, all-reduce)
Embeddings, layer norms, the conv subsampler and the LM head stay replicated (identical on every TP rank, as
are their gradients, because every input to them is identical after the row-parallel all-reduces).

Collectives per training step (no selection traffic): forward one all-reduce per attention and per FFN;
backward one all-reduce per attention input (two for cross-attention: x and memory) and per FFN input.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from hs_scale.parallel.layout import LayoutError, ParallelGroups, check_ffn, check_heads
from hs_scale.parallel.tp_attention import (
    TPHeadSelector,
    TPSelectedHeadAttention,
    _linear_init,
    _partition,
    _row_parallel_out,
    linear_config,
)
from hs_scale.selection.attention import SelectedHeadAttention


@functools.cache
def _column_parallel_out():
    from megatron.core.tensor_parallel import ColumnParallelLinear

    class ColumnParallelOut(ColumnParallelLinear):
        """ColumnParallelLinear returning only this rank's output slice (bias included)."""

        def forward(self, input_: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            out, _ = super().forward(input_)
            return out

    return ColumnParallelOut


@torch.no_grad()
def _shard_ffn(layer: nn.Module, groups: ParallelGroups) -> None:
    fc1, fc2 = layer.fc1, layer.fc2
    d, f = fc1.in_features, fc1.out_features
    cfg = linear_config(groups.tp_size, fc1.weight.dtype)
    col = _column_parallel_out()(
        d,
        f,
        config=cfg,
        init_method=_linear_init,
        bias=fc1.bias is not None,
        gather_output=False,
        tp_group=groups.tp,
    )
    row = _row_parallel_out()(
        f,
        d,
        config=cfg,
        init_method=_linear_init,
        bias=fc2.bias is not None,
        input_is_parallel=True,
        skip_bias_add=False,
        tp_group=groups.tp,
    )
    part = _partition(groups.tp_rank, groups.tp_size, f)
    col.weight.copy_(fc1.weight[part])
    if fc1.bias is not None:
        col.bias.copy_(fc1.bias[part])
    row.weight.copy_(fc2.weight[:, part])
    if fc2.bias is not None:
        row.bias.copy_(fc2.bias)
    layer.fc1, layer.fc2 = col, row


def parallelize_tensor(model: nn.Module, groups: ParallelGroups) -> nn.Module:
    """Shard `model` (a Seq2SeqModel) over groups.tp in place and return it; a no-op at TP size 1.

    Refuses (LayoutError) head or FFN counts that do not split over the TP size, before touching anything.
    """
    t = groups.tp_size
    if t == 1:
        return model
    cfg = getattr(model, "config", None)
    if cfg is not None:
        sel = getattr(model, "selection_config", None)
        pool = sel.pool_heads if sel is not None and sel.enabled else cfg.num_heads
        problems = check_heads(cfg.num_heads, pool, t, sel.strategy if sel is not None else "group")
        problems += check_ffn(cfg.ffn_dim, t)
        if problems:
            raise LayoutError("; ".join(problems))
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, SelectedHeadAttention) and not isinstance(child, TPSelectedHeadAttention):
                setattr(module, name, TPSelectedHeadAttention.from_dense(child, groups.tp))
        if isinstance(getattr(module, "fc1", None), nn.Linear) and isinstance(getattr(module, "fc2", None), nn.Linear):
            _shard_ffn(module, groups)
    selectors = getattr(model, "selectors", None)
    if selectors is not None:
        for name in list(selectors.keys()):
            if not isinstance(selectors[name], TPHeadSelector):
                selectors[name] = TPHeadSelector.from_full(selectors[name], groups.tp_rank, t)
    return model


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
