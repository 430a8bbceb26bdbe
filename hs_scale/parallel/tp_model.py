"""Apply tensor parallelism to a built model (encoder-decoder or decoder-only LM) from the outside (torchtitan
style: the model code is written for one device; this swaps its modules for TP shards, in place).

    model = build_model(model_cfg, selection_cfg, num_tasks)   # same seed on every rank
    parallelize_tensor(model, groups)                           # this rank's shards

Swaps (t = TP size; each swap copies the rank's shard of the dense weights, so the TP model computes exactly
what the dense one did):
  * every SelectedHeadAttention -> the same class built with MegatronProjections (pool heads / slots split,
    see tp_attention.py)
  * every HeadSelector (phi [K, L, H']) -> its pool partition `selector.part(rank=k, partitions=t)`
    (phi [K, L, H'/t]; selection stays local)
  * every FFN fc1 -> ColumnParallelLinear (F/t outputs), fc2 -> RowParallelLinear (F/t inputs, all-reduce)
  * the LM (hs_scale/models/lm/tp_plan.py): every GQASelectedAttention -> its KV heads, their slots and
    candidates (`shard_gqa_attention`); the selector's pool partition keeps selecting per KV head
    (`HeadSelector.rank_partitions`); SwiGLU gate/up_proj -> column-parallel, down_proj -> row-parallel
Embeddings, layer norms, the conv subsampler and the LM head stay replicated here (the pipeline chunk swaps in the
vocab-parallel embedding / head, hs_scale/parallel/pipeline.py and lm_pipeline.py) (identical on every TP rank, as
are their gradients, because every input to them is identical after the row-parallel all-reduces).

Collectives per training step (no selection traffic): forward one all-reduce per attention and per FFN;
backward one all-reduce per attention input (two for cross-attention: x and memory) and per FFN input.
"""

from __future__ import annotations

from torch import nn

from hs_scale.parallel.layout import ParallelGroups
from hs_scale.parallel.tp_attention import MegatronProjections, shard_attention, shard_gqa_attention, shard_linear_
from hs_scale.selection.attention import SelectedHeadAttention
from hs_scale.selection.gqa import GQASelectedAttention
from hs_scale.selection.selector import HeadSelector


def _shard_ffn(layer: nn.Module, groups: ParallelGroups) -> None:
    """fc1 -> column-parallel (F/t outputs), fc2 -> row-parallel (F/t inputs, one all-reduce); this rank's slices."""
    fc1, fc2 = layer.fc1, layer.fc2
    spec = MegatronProjections(groups.tp, fc1.weight.dtype)
    col = spec.column(fc1.in_features, fc1.out_features, fc1.bias is not None)
    row = spec.row(fc2.in_features, fc2.out_features, fc2.bias is not None)
    shard_linear_(fc1, col, 0, groups.tp_rank, groups.tp_size)
    shard_linear_(fc2, row, 1, groups.tp_rank, groups.tp_size)
    layer.fc1, layer.fc2 = col, row


def _shard_swiglu(mlp: nn.Module, groups: ParallelGroups) -> None:
    """gate_proj / up_proj -> column-parallel (I/t outputs), down_proj -> row-parallel (one all-reduce).

    The SwiGLU calls its three linears as modules: each column-parallel call enters the TP region on its own,
    so backward all-reduces dL/dx twice (once per branch; their sum is the single-device gradient)."""
    spec = MegatronProjections(groups.tp, mlp.down_proj.weight.dtype)
    for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
        dense = getattr(mlp, name)
        build = spec.column if dim == 0 else spec.row
        shard = build(dense.in_features, dense.out_features, dense.bias is not None)
        shard_linear_(dense, shard, dim, groups.tp_rank, groups.tp_size)
        setattr(mlp, name, shard)


def parallelize_tensor(model: nn.Module, groups: ParallelGroups) -> nn.Module:
    """Shard `model` (a Seq2SeqModel or an LMModel) over groups.tp in place and return it; a no-op at TP size 1.

    The sizes were validated when the config was loaded (hs_scale.config: head_problems, check_ffn); a model
    built outside a config that does not split fails in the layer constructors.
    """
    t = groups.tp_size
    if t == 1:
        return model
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, SelectedHeadAttention) and child.projections.partitions == 1:
                setattr(module, name, shard_attention(child, groups.tp))
            elif isinstance(child, GQASelectedAttention) and child.projections.partitions == 1:
                setattr(module, name, shard_gqa_attention(child, groups.tp))
            elif isinstance(child, HeadSelector) and child.rank is None:
                setattr(module, name, child.part(rank=groups.tp_rank, partitions=t))
        if isinstance(getattr(module, "fc1", None), nn.Linear) and isinstance(getattr(module, "fc2", None), nn.Linear):
            _shard_ffn(module, groups)
        if all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
            _shard_swiglu(module, groups)
    return model
