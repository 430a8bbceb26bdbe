"""Tensor-parallel head selection: each TP rank owns whole groups of the pool, their phi, and H/t slots.

Legend: B batch, T query length, S key length, D width, K tasks, L layers, P = H' pool heads, H slots,
d = D / H head dim, t TP size, k TP rank. "Local" means this rank's share: P/t pool heads, H/t slots.

Layout (docs/method.md, tensor parallelism). Groups are contiguous (group g = pool heads [g*r, (g+1)*r)), so
TP rank k owns
  * groups k*H/t .. (k+1)*H/t - 1, i.e. pool heads [k*P/t, (k+1)*P/t): the rows of q/k/v_proj
    (megatron ColumnParallelLinear over pool heads, contiguous split),
  * slots [k*H/t, (k+1)*H/t): the columns of out_proj (megatron RowParallelLinear over slots),
  * phi[:, :, k*P/t:(k+1)*P/t]: its slice of the selector logits (`TPHeadSelector`).
Each rank selects and computes exactly H/t heads from its own logits and its own columns of the full-pool
Gumbel noise (a pure function of (seed, draw, layer), so slicing reproduces the single-process draw): selection
needs no communication. Group selection is unchanged by this. The subset strategy becomes a *balanced* subset:
top-(H/t) inside each rank's partition, identical to plain subset at t = 1; the single-process equivalent is
`select_heads(..., partitions=t)`.

Communication per attention layer: forward one all-reduce (out_proj, row-parallel); backward one all-reduce of
dL/dx for the shared q/k/v input (plus one for the memory in cross-attention, unless the caller already put the
memory in the TP region once for all layers: `memory_in_tp_region=True`).

NOTE: q/k/v_proj are megatron ColumnParallelLinear modules (parameter layout, TP attributes, sharded checkpoints)
but their forward is not called: like the single-device layer, we gather the selected heads' rows of the weight
and project with those only (the pool is never computed). The column-parallel input region (identity forward,
all-reduce backward) is applied explicitly, once for q, k and v together.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
from torch import Tensor, nn

from hs_scale.parallel.layout import LayoutError, check_heads
from hs_scale.selection.attention import SelectedHeadAttention
from hs_scale.selection.selector import HeadChoice, HeadSelector, select_heads, selection_noise


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


def _linear_init(weight: Tensor) -> None:
    """nn.Linear's default weight init, so a TP layer built from scratch matches the single-device one."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


@functools.cache
def _row_parallel_out():
    from megatron.core.tensor_parallel import RowParallelLinear

    class RowParallelOut(RowParallelLinear):
        """RowParallelLinear returning only the output (the bias is added after the all-reduce)."""

        def forward(self, input_: Tensor) -> Tensor:  # type: ignore[override]
            out, _ = super().forward(input_)
            return out

    return RowParallelOut


def _partition(rank: int, size: int, n: int) -> slice:
    return slice(rank * n // size, (rank + 1) * n // size)


def shard_choice(choice: HeadChoice, tp_rank: int, tp_size: int, pool_heads: int) -> HeadChoice:
    """This rank's part of a full-pool choice made with `partitions=tp_size`: local slots, local head indices.

    heads [K, H] -> [K, H/t] with values in [0, P/t); raises if a slot's head lies outside the rank's partition
    (a choice that was not made per partition cannot be computed without communication).
    """
    H = choice.heads.shape[1]
    slots, width = _partition(tp_rank, tp_size, H), pool_heads // tp_size
    local = choice.heads[:, slots] - tp_rank * width
    if local.numel() and (local.min() < 0 or local.max() >= width):
        raise ValueError(
            f"choice puts heads outside TP rank {tp_rank}'s pool partition; select with partitions={tp_size}"
        )
    return HeadChoice(heads=local, weights=choice.weights[:, slots])


class TPHeadSelector(HeadSelector):
    """HeadSelector holding only this TP rank's slice of phi: logits [K, L, P/t]; forward -> local choices.

    Constructed with the *global* sizes; the full phi is drawn (same RNG use as one process) and sliced, so a
    TP2 run and a single process started from the same seed hold the same logits. `pool_heads`/`active_heads`
    then hold the local sizes (P/t, H/t); `kl()` is this rank's share of the KL (sum it over TP ranks to log it,
    the gradient needs nothing more).
    """

    def __init__(
        self,
        num_tasks: int,
        num_layers: int,
        pool_heads: int,
        active_heads: int,
        *,
        tp_rank: int,
        tp_size: int,
        **kwargs,
    ):
        problems = check_heads(active_heads, pool_heads, tp_size, kwargs.get("strategy", "group"))
        if problems:
            raise LayoutError("; ".join(problems))
        super().__init__(num_tasks, num_layers, pool_heads, active_heads, **kwargs)
        cols = _partition(tp_rank, tp_size, pool_heads)
        self.logits = nn.Parameter(self.logits.detach()[:, :, cols].clone())
        self._mark_tp(self.logits)
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.global_pool_heads, self.global_active_heads = pool_heads, active_heads
        self.pool_heads, self.active_heads = pool_heads // tp_size, active_heads // tp_size

    @staticmethod
    def _mark_tp(param: Tensor) -> None:
        """megatron attributes: sharded along the pool dim (grad-norm and checkpoints treat it as TP-split)."""
        try:
            from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes
        except ImportError:
            return
        set_tensor_model_parallel_attributes(param, True, 2, 1)

    @classmethod
    def from_full(cls, full: HeadSelector, tp_rank: int, tp_size: int) -> TPHeadSelector:
        """The rank's slice of an existing single-process selector (logits, draw counter and temperature)."""
        sel = cls(
            full.num_tasks,
            full.num_layers,
            full.pool_heads,
            full.active_heads,
            tp_rank=tp_rank,
            tp_size=tp_size,
            strategy=full.strategy,
            temperature=float(full.temperature),
            seed=full.seed,
            first_layer=full.first_layer,
        )
        with torch.no_grad():
            sel.logits.copy_(full.logits[:, :, _partition(tp_rank, tp_size, full.pool_heads)])
            sel.draws.copy_(full.draws)
        sel.train(full.training)
        return sel

    @property
    def pool_offset(self) -> int:
        """Global index of this rank's first pool head."""
        return self.tp_rank * self.pool_heads

    def forward(self) -> list[HeadChoice]:
        """One local HeadChoice per layer (heads in [0, P/t), weights [K, H/t]); training consumes one draw."""
        tau = float(self.temperature)
        draw, cols = int(self.draws), _partition(self.tp_rank, self.tp_size, self.global_pool_heads)
        choices = []
        for layer in range(self.num_layers):
            noise = None
            if self.training:
                full_KP = selection_noise(
                    self.seed, draw, self.first_layer + layer, self.num_tasks, self.global_pool_heads
                )
                noise = full_KP[:, cols].to(self.logits.device)
            choices.append(select_heads(self.logits[:, layer], self.active_heads, self.strategy, tau, noise))
        if self.training:
            self.draws += 1
        return choices

    @torch.no_grad()
    def table(self) -> list[list[list[int]]]:
        """Deterministic selection of this rank's slots, as *global* pool-head indices: table[task][layer]."""
        local = super().table()
        return [[[h + self.pool_offset for h in heads] for heads in per_layer] for per_layer in local]


class TPSelectedHeadAttention(SelectedHeadAttention):
    """SelectedHeadAttention whose pool and slots are split over a TP group (see module docstring).

    Same forward signature as the single-device layer; `choice` is the *local* HeadChoice (from TPHeadSelector,
    or `shard_choice` of a full one). Attributes num_heads / pool_heads hold the local H/t and P/t.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        pool_heads: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        backend: str = "sdpa",
        *,
        tp_group,
        params_dtype: torch.dtype = torch.float32,
    ):
        from megatron.core.tensor_parallel import ColumnParallelLinear

        nn.Module.__init__(self)  # the parent's __init__ would build the full pool; we build the shards
        pool_heads = pool_heads or num_heads
        t = tp_group.size()
        problems = check_heads(num_heads, pool_heads, t, "subset")
        if embed_dim % num_heads:
            problems.append(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        if problems:
            raise LayoutError("; ".join(problems))
        self.tp_group, self.tp_rank, self.tp_size = tp_group, tp_group.rank(), t
        self.embed_dim, self.head_dim = embed_dim, embed_dim // num_heads
        self.global_heads, self.global_pool_heads = num_heads, pool_heads
        self.num_heads, self.pool_heads = num_heads // t, pool_heads // t
        self.dropout, self.backend = dropout, backend
        cfg = linear_config(t, params_dtype)
        d = self.head_dim
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(
                self,
                name,
                ColumnParallelLinear(
                    embed_dim,
                    pool_heads * d,
                    config=cfg,
                    init_method=_linear_init,
                    bias=bias,
                    gather_output=False,
                    skip_bias_add=True,
                    tp_group=tp_group,
                ),
            )
        self.out_proj = _row_parallel_out()(
            num_heads * d,
            embed_dim,
            config=cfg,
            init_method=_linear_init,
            bias=bias,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=tp_group,
        )

    @classmethod
    def from_dense(cls, layer: SelectedHeadAttention, tp_group) -> TPSelectedHeadAttention:
        """Shard a single-device layer: this rank's pool rows of q/k/v_proj and slot columns of out_proj."""
        tp = cls(
            layer.embed_dim,
            layer.num_heads,
            layer.pool_heads,
            layer.dropout,
            layer.q_proj.bias is not None,
            layer.backend,
            tp_group=tp_group,
            params_dtype=layer.q_proj.weight.dtype,
        )
        tp.load_dense_(layer)
        tp.train(layer.training)
        return tp

    @torch.no_grad()
    def load_dense_(self, layer: SelectedHeadAttention) -> None:
        d, rank, t = self.head_dim, self.tp_rank, self.tp_size
        rows = _partition(rank, t, layer.pool_heads * d)  # pool heads are row blocks of d: contiguous split
        for name in ("q_proj", "k_proj", "v_proj"):
            src, dst = getattr(layer, name), getattr(self, name)
            dst.weight.copy_(src.weight[rows])
            if src.bias is not None:
                dst.bias.copy_(src.bias[rows])
        cols = _partition(rank, t, layer.num_heads * d)
        self.out_proj.weight.copy_(layer.out_proj.weight[:, cols])
        if layer.out_proj.bias is not None:
            self.out_proj.bias.copy_(layer.out_proj.bias)

    def forward(
        self,
        x_BTD: Tensor,
        *,
        choice: HeadChoice | None = None,
        task_B=None,
        memory_BSD: Tensor | None = None,
        key_padding_mask_BS: Tensor | None = None,
        causal: bool = False,
        cache: dict | None = None,
        memory_in_tp_region: bool = False,
    ) -> Tensor:
        """Output [B, T, D], identical on every TP rank (after the row-parallel all-reduce).

        memory_in_tp_region: the caller already applied `copy_to_tensor_model_parallel_region` to memory_BSD
        (do it once per decoder to get one backward all-reduce instead of one per cross-attention layer).
        """
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, get_cuda_rng_tracker

        x_BTD = copy_to_tensor_model_parallel_region(x_BTD, group=self.tp_group)
        if memory_BSD is not None and not memory_in_tp_region and not (cache is not None and "k" in cache):
            memory_BSD = copy_to_tensor_model_parallel_region(memory_BSD, group=self.tp_group)
        # Attention dropout acts on this rank's heads: draw it from the TP-rank-specific RNG stream.
        rng = get_cuda_rng_tracker().fork() if self.training and self.dropout > 0 else contextlib.nullcontext()
        with rng:
            return super().forward(
                x_BTD,
                choice=choice,
                task_B=task_B,
                memory_BSD=memory_BSD,
                key_padding_mask_BS=key_padding_mask_BS,
                causal=causal,
                cache=cache,
            )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, tp={self.tp_rank}/{self.tp_size} (global heads={self.global_heads}, "
            f"pool={self.global_pool_heads})"
        )
