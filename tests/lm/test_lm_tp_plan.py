"""The LM's tensor-parallel plan on one process: rank shards of a layer sum to the full layer, and each rank's
selection from its slice of the logits (and of the noise) is the global selection restricted to the rank.

Legend: t TP size, K tasks, H slots, G KV heads, r candidates, P pool, d head dim.
"""

from __future__ import annotations

import pytest
import torch

from hs_scale.models.lm import LMConfig, LMModel
from hs_scale.models.lm.model import rope_tables
from hs_scale.models.lm.tp_plan import check_tensor_parallel, shard_state_dict
from hs_scale.selection.attention import TaskSegments
from hs_scale.selection.config import SelectionConfig
from hs_scale.selection.gqa import DocumentLayout, GQASelectedAttention, positions_in_documents
from hs_scale.selection.selector import select_heads, selection_noise

K, H, G, R, T_SIZE = 3, 8, 4, 2, 2


@pytest.mark.parametrize("strategy", ["group", "subset"])
def test_tp_shards_sum_to_the_full_layer_without_selection_communication(strategy):
    cfg = LMConfig(vocab_size=40, hidden_size=64, intermediate_size=32, num_layers=1, num_heads=H,
                   num_kv_heads=G, attention_bias=True, output_bias=True)
    torch.manual_seed(0)
    model = LMModel(cfg, SelectionConfig(strategy=strategy, pool_heads=H * R, seed=3), num_tasks=K).train()
    with torch.no_grad():
        model.selector.logits.normal_(0, 2)
    draw = int(model.selector.draws)
    choice = model.selector()[0]
    docs, tasks = torch.tensor([[0, 0, 0, 1, 1, 1, 1]]), torch.tensor([[2, 2, 2, 0, 0, 0, 0]])
    x = torch.randn(1, 7, 64)
    cos, sin = rope_tables(positions_in_documents(docs), cfg.head_dim, cfg.rope_theta, x.dtype)
    layout, tokens = DocumentLayout.build(docs, 7, "sdpa"), TaskSegments(tasks.reshape(-1))
    attn = model.layers[0].self_attn
    full = attn(x, cos, sin, layout, choice, tokens)

    noise_KP = selection_noise(3, draw, 0, K, H * R)
    total, P_local, H_local = 0, H * R // T_SIZE, H // T_SIZE
    for rank in range(T_SIZE):
        shard = shard_state_dict(model.state_dict(), cfg, T_SIZE, rank)
        part = slice(rank * P_local, (rank + 1) * P_local)
        local = select_heads(shard["selector.logits"][:, 0], H_local, strategy, 5.0, noise_KP[:, part],
                             partitions=G // T_SIZE)
        assert (local.heads + rank * P_local).tolist() == choice.heads[:, rank * H_local:(rank + 1) * H_local].tolist()
        rank_attn = GQASelectedAttention(64, H_local, G // T_SIZE, cfg.head_dim, R, qkv_bias=True, o_bias=False)
        prefix = "layers.0.self_attn."
        rank_attn.load_state_dict({k.removeprefix(prefix): v for k, v in shard.items()
                                   if k.startswith(prefix) and k != prefix + "o_proj.bias"})
        total = total + rank_attn(x, cos, sin, layout, local, tokens)  # the row-parallel all-reduce
    torch.testing.assert_close(total + attn.o_proj.bias, full, atol=1e-5, rtol=1e-5)


def test_tp_size_must_divide_the_kv_heads():
    cfg = LMConfig(hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=48, vocab_size=40)
    assert check_tensor_parallel(cfg, 2) == []
    (problem,) = check_tensor_parallel(cfg, 4)[:1]
    assert "model.num_kv_heads=2" in problem and "tensor_parallel=4" in problem
    with pytest.raises(ValueError, match="num_kv_heads"):
        shard_state_dict({}, cfg, 4, 0)


def test_lm_config_file_builds_a_model():
    from pathlib import Path

    import yaml

    raw = yaml.safe_load((Path(__file__).parents[2] / "configs" / "lm_demo.yaml").read_text())
    cfg, sel = LMConfig(**raw["model"]), SelectionConfig(**raw["selection"])
    model = LMModel(cfg, sel, num_tasks=8)
    assert model.candidates == 2 and model.selector.logits.shape == (8, cfg.num_layers, 8)
    assert check_tensor_parallel(cfg, 2) == []
    logits = model(torch.zeros(1, 3, dtype=torch.long), task_BL=torch.tensor([5]))
    assert logits.shape == (1, 3, cfg.vocab_size)


@pytest.mark.parametrize("strategy", ["group", "subset"])
def test_tp_rank_selectors_select_per_kv_head_like_one_process(strategy):
    """`parallelize_tensor` cuts the LM's selector (partitions = G) into TP parts: with G/t = 2 KV heads per rank
    each part keeps selecting per KV head (HeadSelector.rank_partitions), so the ranks' draws and tables are the
    single-process ones restricted to the rank."""
    cfg = LMConfig(vocab_size=40, hidden_size=64, intermediate_size=32, num_layers=2, num_heads=H, num_kv_heads=G)
    model = LMModel(cfg, SelectionConfig(strategy=strategy, pool_heads=H * R, seed=5), num_tasks=K).train()
    with torch.no_grad():
        model.selector.logits.normal_(0, 2)
    parts = [model.selector.part(rank=k, partitions=T_SIZE) for k in range(T_SIZE)]
    assert [p.rank_partitions for p in parts] == [G // T_SIZE] * T_SIZE
    full, local = model.selector(), [p() for p in parts]
    P_local, H_local = H * R // T_SIZE, H // T_SIZE
    for layer in range(cfg.num_layers):
        joined = torch.cat([c[layer].heads + k * P_local for k, c in enumerate(local)], dim=1)
        assert joined.tolist() == full[layer].heads.tolist()
        assert all(c[layer].heads.shape == (K, H_local) for c in local)
    tables = [p.table() for p in parts]
    joined = [[sum((t[k][layer] for t in tables), []) for layer in range(cfg.num_layers)] for k in range(K)]
    assert joined == model.selector.table()


def test_config_refuses_a_tp_size_that_does_not_divide_the_kv_heads():
    from hs_scale.config import ConfigError, config_from_dict

    raw = {"model": {"arch": "lm", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2,
                     "num_heads": 4, "num_kv_heads": 2},
           "selection": {"pool_heads": 8, "task_key": "lang"},
           "data": {"manifest": "unused", "modality": "lm", "task_key": "lang"},
           "parallel": {"tensor_parallel": 4}}
    with pytest.raises(ConfigError, match=r"parallel.tensor_parallel=4 does not divide model.num_kv_heads=2.*"
                                          r"use tensor_parallel in \[1, 2\]"):
        config_from_dict(raw)
    raw["parallel"] = {"tensor_parallel": 2, "pipeline_parallel": 2}  # TP, PP and TP x PP load
    assert config_from_dict(raw).parallel.model_parallel == 4
