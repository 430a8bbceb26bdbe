"""LAHIS scores against independent computations, on tiny random decoders of every supported family."""

import math

import pytest
import torch
import torch.nn.functional as F
from lahis_helpers import FAMILIES, make_lm, random_docs
from torch.func import functional_call

from hs_scale.analysis.lahis import (
    HeadMask,
    ablation_matrix,
    head_sets,
    lahis_scores,
    mask_without,
    mean_loss,
    single_head_ablation,
    top_heads,
)


def _doc_loss(model, doc, params=None):
    ids = torch.tensor([doc])
    out = model(input_ids=ids) if params is None else functional_call(model, params, (), {"input_ids": ids})
    return F.cross_entropy(out.logits[0, :-1].double(), ids[0, 1:])


def _masked_weights(model, m_LH):
    """The model's parameters with every o_proj weight's head columns scaled by m (no hook involved)."""
    params = dict(model.named_parameters())
    D = model.config.hidden_size // m_LH.shape[1]
    for i, layer in enumerate(model.model.layers):
        name = f"model.layers.{i}.self_attn.o_proj.weight"
        params[name] = layer.self_attn.o_proj.weight * m_LH[i].repeat_interleave(D)[None, :]
    return params


def _score_from_grads(g_NLH):
    """The LAHIS formula at m = 1, written out on stacked per-document gradients."""
    return g_NLH.abs().mean(0) * (g_NLH < 0).double().mean(0)


def test_scores_equal_finite_differences():
    model = make_lm("llama", dtype=torch.float64)
    docs = random_docs(3, max_len=8)
    got = lahis_scores(model, docs)["scores"]
    eps = 1e-2  # RMSNorm computes in fp32 even in an fp64 model: central differences need a large step
    for layer, head in [(0, 3), (1, 1), (1, 2)]:
        grads = []
        for doc in docs:
            plus, minus = torch.ones(2, 4, dtype=torch.float64), torch.ones(2, 4, dtype=torch.float64)
            plus[layer, head] += eps
            minus[layer, head] -= eps
            with torch.no_grad():
                with HeadMask(model, plus):
                    lp = _doc_loss(model, doc)
                with HeadMask(model, minus):
                    lm = _doc_loss(model, doc)
            grads.append(float(lp - lm) / (2 * eps))
        g = torch.tensor(grads, dtype=torch.float64)
        expected = g.abs().mean() * (g < 0).double().mean()
        assert float(got[layer, head]) == pytest.approx(float(expected), rel=1e-3, abs=1e-9)
    assert got.abs().sum() > 0


def test_scores_equal_per_document_autograd_loop_with_weight_scaling():
    """Brute force: one autograd.grad per document through scaled o_proj weights (no hook), formula applied after."""
    model = make_lm("llama", dtype=torch.float64)
    docs = random_docs(5, seed=3)
    grads = []
    for doc in docs:
        m = torch.ones(2, 4, dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(_doc_loss(model, doc, _masked_weights(model, m)), m)
        grads.append(g)
    expected = _score_from_grads(torch.stack(grads))
    out = lahis_scores(model, docs)
    torch.testing.assert_close(out["scores"], expected, rtol=1e-6, atol=1e-12)  # fp32 RMSNorm rounding
    assert out["documents"] == 5 and out["scores"].dtype == torch.float64
    # Batched documents (each with its own mask copy) give the same per-document gradients.
    torch.testing.assert_close(lahis_scores(model, docs, batch_size=3)["scores"], expected, rtol=1e-7, atol=1e-12)


def test_scores_do_not_depend_on_document_order_or_move_the_mask():
    model = make_lm("llama", dtype=torch.float64)
    docs = random_docs(4, seed=5)
    a = lahis_scores(model, docs)["scores"]
    b = lahis_scores(model, docs[::-1])["scores"]
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_truncation_at_max_tokens():
    model = make_lm("llama", dtype=torch.float64)
    docs = random_docs(3, min_len=10)
    torch.testing.assert_close(lahis_scores(model, docs, max_tokens=5)["scores"],
                               lahis_scores(model, [d[:5] for d in docs])["scores"])


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_hook_identity_and_zeroing(family):
    model = make_lm(family)
    ids = torch.tensor([random_docs(1, seed=7, min_len=9)[0]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with HeadMask(model):
            same = model(input_ids=ids).logits
        assert torch.equal(ref, same)
        with HeadMask(model, mask_without([(1, 2)], 2, 4)):
            masked = model(input_ids=ids).logits
        assert not torch.allclose(masked, ref)
        model.model.layers[1].self_attn.o_proj.weight[:, 16:24] = 0.0  # head 2's input columns (head dim 8)
        torch.testing.assert_close(masked, model(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    scores = lahis_scores(model, random_docs(2), batch_size=2)["scores"]
    assert scores.shape == (2, 4) and torch.isfinite(scores).all() and scores.sum() > 0
    torch.testing.assert_close(scores, lahis_scores(model, random_docs(2))["scores"], rtol=1e-4, atol=1e-9)


def test_head_sets_specific_and_general():
    base = torch.arange(20, dtype=torch.float64).reshape(4, 5) / 100  # ranks shared by all languages
    scores = {}
    for k, lang in enumerate(["a", "b", "c"]):
        s = base.clone()
        s[k, 0] = 10.0  # one head of its own per language
        scores[lang] = s
    sets = head_sets(scores, quantile=0.85, min_languages=3)
    # 0.85 quantile of 20 entries keeps the top 3: own head, then (3,4) and (3,3) shared by all three languages.
    assert sets["top"]["a"] == [(0, 0), (3, 4), (3, 3)]
    assert sets["general"] == [(3, 3), (3, 4)]
    assert sets["specific"] == {"a": [(0, 0)], "b": [(1, 0)], "c": [(2, 0)]}
    assert head_sets(scores, 0.85)["min_languages"] == 3  # default min(4, languages)
    assert top_heads(base, 0.96) == [(3, 4)]
    with pytest.raises(ValueError, match="quantile"):
        top_heads(base, 1.0)


def test_ablation_matrix_and_single_head_ablation():
    model = make_lm("llama", layers=2, heads=4)
    docs = {"a": random_docs(3, seed=1), "b": random_docs(3, seed=2)}
    heads = {"a": [(0, 1)], "b": [(1, 3), (0, 0)]}
    out = ablation_matrix(model, docs, heads, batch_size=2)
    base_b = mean_loss(model, docs["b"])
    masked_b_by_a = mean_loss(model, docs["b"], mask_without(heads["a"], 2, 4))
    assert out["ratio"][1][0] == pytest.approx(math.exp(masked_b_by_a - base_b), rel=1e-5)
    assert out["base_ppl"]["b"] == pytest.approx(math.exp(base_b), rel=1e-6)
    d = (out["ratio"][0][0] + out["ratio"][1][1]) / 2 - 1
    o = (out["ratio"][0][1] + out["ratio"][1][0]) / 2 - 1
    assert out["diag_over_offdiag"] == pytest.approx(d / o, rel=1e-9)
    single = single_head_ablation(model, docs["a"], batch_size=3)
    assert float(single[0, 1]) == pytest.approx(mean_loss(model, docs["a"], mask_without([(0, 1)], 2, 4))
                                                 - mean_loss(model, docs["a"]), rel=1e-5, abs=1e-7)


def test_refuses_docs_without_targets():
    with pytest.raises(ValueError, match="at least one target"):
        lahis_scores(make_lm("llama"), [[5], []])
