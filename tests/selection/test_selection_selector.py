"""Selector behaviour: strategies, straight-through weights, determinism, KL, and the dense special case."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from hs_scale.selection.attention import SelectedHeadAttention
from hs_scale.selection.config import SelectionConfig
from hs_scale.selection.selector import HeadSelector, bernoulli_kl, select_heads, selection_noise


def test_group_slots_take_one_head_of_their_own_group():
    torch.manual_seed(0)
    sel = HeadSelector(num_tasks=4, num_layers=3, pool_heads=12, active_heads=4, strategy="group")
    for choice in sel():
        r = 3
        assert torch.equal(choice.heads // r, torch.arange(4).expand(4, 4))


def test_subset_is_top_h_in_ascending_order():
    logits = torch.tensor([[0.1, 5.0, -1.0, 3.0, 4.0, 0.0]])
    choice = select_heads(logits, active_heads=3, strategy="subset", temperature=5.0)
    assert choice.heads.tolist() == [[1, 3, 4]]


def test_balanced_subset_under_partitions():
    logits = torch.tensor([[9.0, 8.0, 7.0, 6.0, 0.0, 1.0, 2.0, 3.0]])
    plain = select_heads(logits, 4, "subset", 1.0).heads.tolist()
    balanced = select_heads(logits, 4, "subset", 1.0, partitions=2).heads.tolist()
    assert plain == [[0, 1, 2, 3]]
    assert balanced == [[0, 1, 6, 7]]  # top-2 inside each half of the pool


def test_straight_through_weight_is_one_with_sigmoid_gradient():
    tau = 2.0
    logits = torch.tensor([[0.3, -0.7, 1.1, 0.2]], requires_grad=True)
    choice = select_heads(logits, 2, "group", tau)
    assert torch.equal(choice.weights, torch.ones(1, 2))  # exactly 1, not 1 +- an ulp
    choice.weights.sum().backward()
    s = torch.sigmoid(logits.detach() / tau)
    expected = torch.zeros_like(logits)
    for h in choice.heads[0].tolist():
        expected[0, h] = s[0, h] * (1 - s[0, h]) / tau
    torch.testing.assert_close(logits.grad, expected)


def test_training_draws_advance_and_eval_is_deterministic():
    torch.manual_seed(0)
    sel = HeadSelector(6, 2, 8, 4, strategy="subset", temperature=5.0)
    sel.train()
    draws = [[c.heads.clone() for c in sel()] for _ in range(5)]
    assert int(sel.draws) == 5
    assert any(not torch.equal(draws[0][0], d[0]) for d in draws[1:]), "Gumbel noise should change the choice"
    sel.eval()
    first = [c.heads for c in sel()]
    second = [c.heads for c in sel()]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert int(sel.draws) == 5  # eval consumes no draw
    expected = [select_heads(sel.logits[:, layer], 4, "subset", 5.0).heads for layer in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(first, expected, strict=True))


def test_noise_scale_multiplies_the_training_noise_and_zero_trains_on_the_deterministic_choice():
    """selection.noise_scale: the draw is select_heads over phi + scale * (g1 - g2); at 0 training takes the
    eval-mode choice (still consuming draws, so resume positions do not depend on it) and phi keeps its
    straight-through gradient."""
    torch.manual_seed(0)
    sel = HeadSelector(3, 2, 8, 4, strategy="group", temperature=5.0, seed=7, noise_scale=2.5).train()
    got = [c.heads for c in sel()]
    for layer in range(2):
        noise = 2.5 * selection_noise(7, 0, layer, 3, 8)
        assert torch.equal(got[layer], select_heads(sel.logits[:, layer], 4, "group", 5.0, noise).heads)
    quiet = HeadSelector(3, 2, 8, 4, strategy="group", temperature=5.0, seed=7, noise_scale=0.0).train()
    choices = [quiet() for _ in range(3)]
    assert int(quiet.draws) == 3
    expected = [select_heads(quiet.logits[:, layer], 4, "group", 5.0).heads for layer in range(2)]
    assert all(torch.equal(c.heads, e) for draw in choices for c, e in zip(draw, expected, strict=True))
    sum(c.weights.sum() for c in choices[0]).backward()
    assert quiet.logits.grad is not None and quiet.logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="selection.noise_scale=-1"):
        SelectionConfig(noise_scale=-1)


_CHILD = """
import json, torch
from hs_scale.selection.selector import HeadSelector, selection_noise
torch.manual_seed(7)
sel = HeadSelector(5, 3, 8, 4, strategy="group")
sel.eval()
print(json.dumps({"table": sel.table(), "noise": selection_noise(3, 11, 2, 5, 8).tolist()}))
"""


def test_selection_is_identical_across_processes():
    runs = [json.loads(subprocess.check_output([sys.executable, "-c", _CHILD], text=True)) for _ in range(2)]
    torch.manual_seed(7)
    sel = HeadSelector(5, 3, 8, 4, strategy="group")
    assert runs[0] == runs[1]
    assert runs[0]["table"] == sel.table()
    assert torch.equal(torch.tensor(runs[0]["noise"]), selection_noise(3, 11, 2, 5, 8))


def test_noise_depends_on_draw_and_layer():
    a, b, c = selection_noise(0, 1, 0, 2, 8), selection_noise(0, 2, 0, 2, 8), selection_noise(0, 1, 1, 2, 8)
    assert not torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, selection_noise(0, 1, 0, 2, 8))


def test_kl_hand_computed():
    # q = 1/2 against prior 1/2: zero.  q = 3/4 (logit ln 3) against prior 1/4: 3/4 ln 3 - 1/4 ln 3 = ln(3)/2.
    assert bernoulli_kl(torch.zeros(3), 0.5).abs().max() < 1e-7
    torch.testing.assert_close(bernoulli_kl(torch.tensor([math.log(3)]), 0.25), torch.tensor([math.log(3) / 2]))
    # q = 1/4 against prior 1/2: 1/4 ln(1/2) + 3/4 ln(3/2)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    torch.testing.assert_close(bernoulli_kl(torch.tensor([-math.log(3)]), 0.5), torch.tensor([expected]))


def test_selector_kl_sums_layers_and_heads_and_averages_tasks():
    sel = HeadSelector(num_tasks=2, num_layers=2, pool_heads=4, active_heads=2)  # prior 1/2
    with torch.no_grad():
        sel.logits.zero_()
        sel.logits[1] = math.log(3)  # task 1: q = 3/4 everywhere
    per_head = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    torch.testing.assert_close(sel.kl(torch.tensor([1, 1])), torch.tensor(8 * per_head))
    torch.testing.assert_close(sel.kl(), torch.tensor(8 * per_head / 2))


@pytest.mark.parametrize("padded,causal", [(False, False), (True, False), (False, True)])
def test_dense_case_equals_torch_multihead_attention(padded, causal):
    """H' = H, one task: the layer is nn.MultiheadAttention (same weights)."""
    torch.manual_seed(0)
    D, H, B, T = 32, 4, 3, 6
    ours = SelectedHeadAttention(D, H, pool_heads=H)
    mha = torch.nn.MultiheadAttention(D, H, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        mha.out_proj.weight.copy_(ours.out_proj.weight)
        mha.out_proj.bias.copy_(ours.out_proj.bias)
    sel = HeadSelector(1, 1, H, H, strategy="group")
    x = torch.randn(B, T, D)
    mask = (torch.arange(T)[None] >= torch.tensor([6, 4, 2])[:, None]) if padded else None
    attn_mask = torch.ones(T, T, dtype=torch.bool).triu(1) if causal else None
    expected, _ = mha(x, x, x, key_padding_mask=mask, attn_mask=attn_mask, need_weights=False)
    for choice in (None, sel()[0]):
        got = ours(x, choice=choice, key_padding_mask_BS=mask, causal=causal)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(strategy="topk"), "selection.strategy"),
        (dict(task_key="language"), "selection.task_key"),
        (dict(temperature=0.0), "selection.temperature"),
        (dict(temperature=1.0, temperature_min=2.0), "selection.temperature_min"),
    ],
)
def test_config_refusals_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        SelectionConfig(**kwargs)


def test_pool_must_fit_active_heads():
    with pytest.raises(ValueError, match=r"pool_heads=6 is not a multiple of model.num_heads=4.*pool_heads=8"):
        SelectionConfig(pool_heads=6).check_heads(4)
    with pytest.raises(ValueError, match="smaller than model.num_heads"):
        SelectionConfig(pool_heads=2, strategy="subset").check_heads(4)
    SelectionConfig(pool_heads=6, strategy="subset").check_heads(4)


def test_temperature_annealing():
    cfg = SelectionConfig(temperature=5.0, temperature_min=0.5, temperature_decay=0.01)
    assert cfg.temperature_at(0) == 5.0
    assert cfg.temperature_at(100) == pytest.approx(5.0 * math.exp(-1.0))
    assert cfg.temperature_at(10_000) == 0.5


def test_every_model_family_passes_noise_scale_to_its_selectors():
    from _configs import tiny_model_config

    from hs_scale.models import build_model
    from hs_scale.models.lm.config import LMConfig
    from hs_scale.models.lm.model import LMModel

    selection = SelectionConfig(pool_heads=8, noise_scale=0.0)
    seq2seq = build_model(tiny_model_config("text", num_heads=4), selection, 2)
    lm = LMModel(LMConfig(num_heads=4, num_kv_heads=2, hidden_size=32), selection, 2)
    selectors = [*seq2seq.selectors.values(), lm.selector]
    assert len(selectors) == 4 and all(sel.noise_scale == 0.0 for sel in selectors)
