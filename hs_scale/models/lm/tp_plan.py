"""Tensor-parallel layout of the LM: which slice of every parameter a TP rank owns (the model side of TP).

Legend: t TP size, k TP rank, H slots, G KV heads, r candidates per slot, P = H * r, K tasks.

The pool layout (hs_scale.selection.gqa) keeps everything a KV head needs contiguous, so TP rank k owns
  * KV heads [k*G/t, (k+1)*G/t): the rows of k_proj / v_proj (column-parallel) and its share of the KV cache,
  * the slots reading them, [k*H/t, (k+1)*H/t), and their candidates [k*P/t, (k+1)*P/t): the rows of q_proj
    (column-parallel) and the input columns of o_proj (row-parallel: one all-reduce after it, as for a dense
    GQA model),
  * selector logits phi[:, :, k*P/t:(k+1)*P/t]. Selecting on that slice with ``partitions = G/t`` gives exactly
    the single-process selection (``partitions = G``) restricted to the rank, for group and subset alike,
    because every partition of the pool is one KV head's candidates: selection needs no communication.
  * MLP: gate_proj / up_proj rows (column-parallel), down_proj columns (row-parallel);
    embed_tokens / lm_head: vocabulary rows (vocab-parallel); norms replicated.
``shard_state_dict`` applies this plan to a state dict (tests); the trainer's TP shards are made by
hs_scale/parallel/tp_model.py (`parallelize_tensor`: megatron column/row-parallel linears) and its pipeline stages
by hs_scale/parallel/lm_pipeline.py (vocab-parallel embedding, LM head and loss).
"""

from __future__ import annotations

from torch import Tensor

from hs_scale.models.lm.config import LMConfig

# parameter-name suffix -> dimension split over TP ranks (anything else is replicated)
SPLIT_DIM = {
    "self_attn.q_proj.weight": 0, "self_attn.q_proj.bias": 0,
    "self_attn.k_proj.weight": 0, "self_attn.k_proj.bias": 0,
    "self_attn.v_proj.weight": 0, "self_attn.v_proj.bias": 0,
    "self_attn.o_proj.weight": 1,
    "mlp.gate_proj.weight": 0, "mlp.up_proj.weight": 0, "mlp.down_proj.weight": 1,
    "embed_tokens.weight": 0, "lm_head.weight": 0,
    "selector.logits": 2,
}


def check_tensor_parallel(cfg: LMConfig, tp_size: int) -> list[str]:
    """Problems (one actionable line each) that make ``tp_size`` impossible for this model; empty if none.

    The run config refuses them at load time. The vocabulary is not checked: the trainer pads it to a multiple of
    t (hs_scale.parallel.layout.padded_vocab_size); ``shard_state_dict`` below, which does not pad, checks it.
    """
    problems = []
    if cfg.num_kv_heads % tp_size:
        fits = [t for t in range(1, cfg.num_kv_heads + 1) if cfg.num_kv_heads % t == 0]
        problems.append(
            f"parallel.tensor_parallel={tp_size} does not divide model.num_kv_heads={cfg.num_kv_heads}: each TP "
            f"rank owns whole KV heads with their query slots and candidates; use tensor_parallel in {fits}"
        )
    if cfg.intermediate_size % tp_size:
        problems.append(f"model.intermediate_size={cfg.intermediate_size} is not divisible by "
                        f"parallel.tensor_parallel={tp_size}; use a multiple of {tp_size}")
    return problems


def split_dim(name: str) -> int | None:
    """The dimension of parameter ``name`` split over TP ranks, or None when it is replicated."""
    for suffix, dim in SPLIT_DIM.items():
        if name.endswith(suffix):
            return dim
    return None


def shard_state_dict(state: dict[str, Tensor], cfg: LMConfig, tp_size: int, rank: int) -> dict[str, Tensor]:
    """Rank ``rank``'s slices of a full (our-named) state dict under the plan of the module docstring."""
    problems = check_tensor_parallel(cfg, tp_size)
    if cfg.vocab_size % tp_size:
        problems.append(f"model.vocab_size={cfg.vocab_size} is not divisible by tensor_parallel={tp_size}")
    if problems:
        raise ValueError("; ".join(problems))
    shards = {}
    for name, t in state.items():
        dim = split_dim(name)
        shards[name] = t if dim is None or t.dim() == 0 else t.chunk(tp_size, dim=dim)[rank]
    return shards
