"""Tensor-parallel head selection: the megatron projection spec and the sharding plan of one attention layer.

Legend: B batch, T query length, S key length, D width, K tasks, L layers, P = H' pool heads, H slots,
d = D / H head dim, t TP size, k TP rank. "Local" means this rank's share: P/t pool heads, H/t slots.

Layout (docs/method.md, tensor parallelism). Groups are contiguous (group g = pool heads [g*r, (g+1)*r)), so
TP rank k owns
  * groups k*H/t .. (k+1)*H/t - 1, i.e. pool heads [k*P/t, (k+1)*P/t): the rows of q/k/v_proj
    (megatron ColumnParallelLinear over pool heads, contiguous split),
  * slots [k*H/t, (k+1)*H/t): the columns of out_proj (megatron RowParallelLinear over slots),
  * phi[:, :, k*P/t:(k+1)*P/t]: its slice of the selector logits (`HeadSelector(rank=k, partitions=t)`).
Each rank selects and computes exactly H/t heads from its own logits and its own columns of the full-pool
Gumbel noise (a pure function of (seed, draw, layer), so slicing reproduces the single-process draw): selection
needs no communication. Group selection is unchanged by this. The subset strategy becomes a *balanced* subset:
top-(H/t) inside each rank's partition, identical to plain subset at t = 1; the single-process equivalent is
`select_heads(..., partitions=t)`.

The attention module is hs_scale.selection's `SelectedHeadAttention` itself, built with `MegatronProjections`:
only the projections differ. Communication per attention layer: forward one all-reduce (out_proj,
row-parallel); backward one all-reduce of dL/dx for the shared q/k/v input (plus one for the memory in
cross-attention).

NOTE: q/k/v_proj are megatron ColumnParallelLinear modules (parameter layout, TP attributes, sharded checkpoints)
but their forward is not called: like the single-device layer, we gather the selected heads' rows of the weight
and project with those only (the pool is never computed). The column-parallel input region (identity forward,
all-reduce backward) is applied explicitly (`MegatronProjections.enter`), once for q, k and v together.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from hs_scale.selection.attention import Projections, SelectedHeadAttention
from hs_scale.selection.gqa import GQASelectedAttention
from hs_scale.selection.selector import HeadChoice


def linear_config(tp_size: int, params_dtype: torch.dtype = torch.float32, **overrides):
    """megatron ModelParallelConfig for CPU-initialised TP linears (no sequence parallel, no fusions)."""
    from megatron.core import ModelParallelConfig

    kwargs = dict(
        tensor_model_parallel_size=tp_size,
        use_cpu_initialization=True,
        params_dtype=params_dtype,
        perform_initialization=True,
        sequence_parallel=False,
        gradient_accumulation_fusion=False,
    )
    kwargs.update(overrides)
    return ModelParallelConfig(**kwargs)


def linear_init(weight: Tensor) -> None:
    """nn.Linear's default weight init, so a TP layer built from scratch matches the single-device one."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


@functools.cache
def _output_only_linears():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    class ColumnParallelOut(ColumnParallelLinear):
        """ColumnParallelLinear returning only this rank's output slice (bias included)."""

        def forward(self, input_: Tensor) -> Tensor:  # type: ignore[override]
            out, _ = super().forward(input_)
            return out

    class RowParallelOut(RowParallelLinear):
        """RowParallelLinear returning only the output (the bias is added after the all-reduce)."""

        def forward(self, input_: Tensor) -> Tensor:  # type: ignore[override]
            out, _ = super().forward(input_)
            return out

    return ColumnParallelOut, RowParallelOut


def partition(rank: int, size: int, n: int) -> slice:
    """Rank `rank`'s contiguous share of n items split over `size` ranks."""
    return slice(rank * n // size, (rank + 1) * n // size)


class MegatronProjections(Projections):
    """Projections split over a TP group: megatron column-parallel q/k/v (pool rows), row-parallel out (slots)."""

    def __init__(self, tp_group, params_dtype: torch.dtype = torch.float32):
        self.tp_group, self.rank, self.partitions = tp_group, tp_group.rank(), tp_group.size()
        self.params_dtype = params_dtype

    def column(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return _output_only_linears()[0](
            in_features, out_features, config=linear_config(self.partitions, self.params_dtype),
            init_method=linear_init, bias=bias, gather_output=False, tp_group=self.tp_group,
        )  # fmt: skip

    def row(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return _output_only_linears()[1](
            in_features, out_features, config=linear_config(self.partitions, self.params_dtype),
            init_method=linear_init, bias=bias, input_is_parallel=True, skip_bias_add=False, tp_group=self.tp_group,
        )  # fmt: skip

    def enter(self, x: Tensor) -> Tensor:
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        return copy_to_tensor_model_parallel_region(x, group=self.tp_group)

    def reduce(self, y: Tensor) -> Tensor:
        from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

        return reduce_from_tensor_model_parallel_region(y, group=self.tp_group)

    def dropout_rng(self):
        # Attention dropout acts on this rank's heads: draw it from the TP-rank-specific RNG stream.
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        return get_cuda_rng_tracker().fork()


@torch.no_grad()
def shard_linear_(dense: nn.Linear, shard: nn.Module, dim: int, rank: int, size: int) -> None:
    """Copy rank `rank`'s slice of a dense linear into its megatron shard: rows (dim 0, column-parallel) or
    columns (dim 1, row-parallel, whose bias is replicated)."""
    part = partition(rank, size, dense.weight.shape[dim])
    shard.weight.copy_(dense.weight[part] if dim == 0 else dense.weight[:, part])
    if dense.bias is not None:
        shard.bias.copy_(dense.bias[part] if dim == 0 else dense.bias)


def shard_attention(layer: SelectedHeadAttention, tp_group) -> SelectedHeadAttention:
    """This rank's shard of a single-device layer: its pool rows of q/k/v_proj and slot columns of out_proj."""
    projections = MegatronProjections(tp_group, layer.q_proj.weight.dtype)
    tp = SelectedHeadAttention(
        layer.embed_dim, layer.num_heads, layer.pool_heads, layer.dropout, layer.q_proj.bias is not None,
        layer.backend, projections=projections,
    )  # fmt: skip
    rank, t = projections.rank, projections.partitions
    for name in ("q_proj", "k_proj", "v_proj"):  # pool heads are row blocks of d: a contiguous split
        shard_linear_(getattr(layer, name), getattr(tp, name), 0, rank, t)
    shard_linear_(layer.out_proj, tp.out_proj, 1, rank, t)
    tp.train(layer.training)
    return tp


def shard_gqa_attention(layer: GQASelectedAttention, tp_group) -> GQASelectedAttention:
    """This rank's shard of a single-device GQA layer (the LM): its KV heads' rows of k/v_proj, their slots'
    candidates' rows of q_proj and columns of o_proj (hs_scale/models/lm/tp_plan.py: all contiguous)."""
    projections = MegatronProjections(tp_group, layer.q_proj.weight.dtype)
    rank, t = projections.rank, projections.partitions
    tp = GQASelectedAttention(
        layer.hidden_size, layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.candidates,
        qkv_bias=layer.q_proj.bias is not None, o_bias=layer.o_proj.bias is not None, projections=projections,
    )  # fmt: skip
    for name in ("q_proj", "k_proj", "v_proj"):
        shard_linear_(getattr(layer, name), getattr(tp, name), 0, rank, t)
    shard_linear_(layer.o_proj, tp.o_proj, 1, rank, t)
    tp.train(layer.training)
    return tp


def shard_choice(choice: HeadChoice, tp_rank: int, tp_size: int, pool_heads: int) -> HeadChoice:
    """This rank's part of a full-pool choice made with `partitions=tp_size`: local slots, local head indices.

    heads [K, H] -> [K, H/t] with values in [0, P/t); raises if a slot's head lies outside the rank's partition
    (a choice that was not made per partition cannot be computed without communication).
    """
    H = choice.heads.shape[1]
    slots, width = partition(tp_rank, tp_size, H), pool_heads // tp_size
    local = choice.heads[:, slots] - tp_rank * width
    if local.numel() and (local.min() < 0 or local.max() >= width):
        raise ValueError(
            f"choice puts heads outside TP rank {tp_rank}'s pool partition; select with partitions={tp_size}"
        )
    return HeadChoice(heads=local, weights=choice.weights[:, slots])
