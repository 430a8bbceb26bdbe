"""Selected-head GQA attention equals an independent compute-all-P-candidates-then-gather reference.

Legend: B batch, T length, D width, P pool candidates, H slots, G KV heads, d head dim, K tasks.
The reference projects every candidate head, runs attention for all of them with a mask written out as loops
(causal, and never across a document boundary), then gathers each token's task's heads and their slot weights.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from hs_scale.models.lm import LMConfig, LMModel
from hs_scale.models.lm.model import rope_tables
from hs_scale.selection.attention import TaskSegments
from hs_scale.selection.config import SelectionConfig
from hs_scale.selection.gqa import DocumentLayout, GQASelectedAttention, positions_in_documents
from hs_scale.selection.selector import HeadSelector

D, H, G, d, R, K = 32, 4, 2, 8, 2, 3
# Two packed rows: documents of lengths 4+6 and 3+5+2; per-document languages mix tasks 0..2 in each row.
DOCS = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1], [5, 5, 5, 7, 7, 7, 7, 7, 9, 9]])
TASKS = torch.tensor([[2, 2, 2, 2, 0, 0, 0, 0, 0, 0], [1, 1, 1, 2, 2, 2, 2, 2, 1, 1]])


def loop_mask(doc_BT: torch.Tensor) -> torch.Tensor:
    """allowed[b, i, j]: j <= i and tokens j..i all belong to one document (written out, no shared helper)."""
    B, T = doc_BT.shape
    allowed = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            for j in range(i + 1):
                allowed[b, i, j] = bool((doc_BT[b, j : i + 1] == doc_BT[b, i]).all())
    return allowed


def reference(attn: GQASelectedAttention, x_BTD, doc_BT, task_BT, choice_heads_KH, choice_weights_KH):
    B, T, _ = x_BTD.shape
    P, r = attn.pool_heads, attn.candidates
    n = attn.num_heads // attn.num_kv_heads
    cos, sin = rope_tables(positions_in_documents(doc_BT), d, 10000.0, x_BTD.dtype)
    q_BPTd = attn.q_proj(x_BTD).view(B, T, P, d).transpose(1, 2)
    k_BGTd = attn.k_proj(x_BTD).view(B, T, -1, d).transpose(1, 2)
    v_BGTd = attn.v_proj(x_BTD).view(B, T, -1, d).transpose(1, 2)
    kv_of_P = torch.arange(P) // (n * r)  # candidate j of slot h reads slot h's KV head
    k_BPTd, v_BPTd = k_BGTd[:, kv_of_P], v_BGTd[:, kv_of_P]
    q_BPTd, k_BPTd = apply_rotary_pos_emb(q_BPTd, k_BPTd, cos, sin)
    scores = q_BPTd @ k_BPTd.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(~loop_mask(doc_BT)[:, None], float("-inf"))
    out_BTPd = (scores.softmax(-1) @ v_BPTd).transpose(1, 2)
    heads_BTH, w_BTH = choice_heads_KH[task_BT], choice_weights_KH[task_BT]
    sel_BTHd = out_BTPd.gather(2, heads_BTH[..., None].expand(-1, -1, -1, d))
    Wo_PdD = attn.o_proj.weight.view(-1, P, d).permute(1, 2, 0)
    y = torch.einsum("bthd,bthde,bth->bte", sel_BTHd, Wo_PdD[heads_BTH], w_BTH)
    return y if attn.o_proj.bias is None else y + attn.o_proj.bias


@pytest.mark.parametrize("strategy", ["group", "subset"])
@pytest.mark.parametrize("bias", [False, True])
def test_selected_gqa_equals_reference_values_and_gradients(strategy, bias):
    torch.manual_seed(0)
    # float64: the comparison is of the computation, not of fp32 summation order
    attn = GQASelectedAttention(D, H, G, d, candidates=R, qkv_bias=bias, o_bias=bias).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    selector = HeadSelector(K, 1, H * R, H, strategy=strategy, seed=7, partitions=G).double().train()
    choice = selector()[0]
    x = torch.randn(2, 10, D, dtype=torch.float64, requires_grad=True)
    cos, sin = rope_tables(positions_in_documents(DOCS), d, 10000.0, x.dtype)
    for backend in ("sdpa", "eager"):
        layout = DocumentLayout.build(DOCS, 10, backend)
        got = attn(x, cos, sin, layout, choice, TaskSegments(TASKS.reshape(-1)))
        want = reference(attn, x, DOCS, TASKS, choice.heads, choice.weights)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
        grad_out = torch.randn_like(got)
        inputs = [x, selector.logits, *attn.parameters()]
        g_got = torch.autograd.grad(got, inputs, grad_out, retain_graph=True)
        g_want = torch.autograd.grad(want, inputs, grad_out, retain_graph=True)
        for name, a, b in zip(["x", "logits", *dict(attn.named_parameters())], g_got, g_want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=lambda m, n=name: f"grad {n}: {m}")
        assert g_got[1].abs().sum() > 0  # the straight-through weights reach the selector


@pytest.mark.parametrize("strategy", ["group", "subset"])
def test_every_choice_reads_its_slots_kv_head(strategy):
    """Group and (partitioned) subset selections keep slot h on KV head h // (H/G) for any logits and noise."""
    attn = GQASelectedAttention(D, 8, 2, 4, candidates=3)
    selector = HeadSelector(5, 4, 24, 8, strategy=strategy, partitions=2, init_range=(-5.0, 5.0)).train()
    for _ in range(5):
        for choice in selector():
            assert (attn.kv_head_of(choice.heads) == torch.arange(8) // 4).all()


def tiny_lm(strategy="group", backend="sdpa", **kw):
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=H, num_kv_heads=G,
                   attention_backend=backend, **kw)
    sel = SelectionConfig(strategy=strategy, pool_heads=H * R, init_low=-3.0, init_high=3.0)
    return LMModel(cfg, sel, num_tasks=K).eval()


@pytest.mark.parametrize("strategy", ["group", "subset"])
def test_cached_incremental_decoding_equals_full_forward(strategy):
    model = tiny_lm(strategy)
    ids = torch.randint(0, 50, DOCS.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids, task_BL=TASKS, doc_ids_BL=DOCS)
        cache, parts = model.new_cache(), []
        for start, stop in ((0, 3), (3, 4), (4, 5), (5, 9), (9, 10)):  # chunks cross document boundaries
            parts.append(model(ids[:, start:stop], task_BL=TASKS[:, start:stop], doc_ids_BL=DOCS[:, start:stop],
                               cache=cache))
    assert cache.length == 10
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_tasks_use_their_own_heads_and_backends_agree():
    """A packed row's logits depend on each document's task; eager and SDPA kernels agree."""
    model, eager = tiny_lm(), tiny_lm(backend="eager")
    ids = torch.randint(0, 50, DOCS.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = model(ids, task_BL=TASKS, doc_ids_BL=DOCS)
        torch.testing.assert_close(eager(ids, task_BL=TASKS, doc_ids_BL=DOCS), a, atol=1e-5, rtol=1e-5)
        other = model(ids, task_BL=(TASKS + 1) % K, doc_ids_BL=DOCS)
    table = model.head_selection_table()
    assert table[0] != table[1] or table[1] != table[2]
    assert not torch.allclose(a, other)


def test_bad_inputs_are_refused():
    model = tiny_lm()
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="task_BL is required"):
        model(ids)
    with pytest.raises(ValueError, match="out of range"):
        model(ids, task_BL=torch.tensor([0, K]))
    with pytest.raises(ValueError, match="pool_heads=6 is not a multiple"):
        LMModel(LMConfig(num_heads=4, num_kv_heads=2, hidden_size=32), SelectionConfig(pool_heads=6), 2)
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide"):
        LMConfig(num_heads=4, num_kv_heads=3)


def test_varlen_layout_packs_documents(monkeypatch):
    """The varlen path (CUDA kernels) on CPU: cu_seqlens from document boundaries, and the packing around the
    kernel, checked with a per-document SDPA standing in for torch.nn.attention.varlen.varlen_attn."""
    import hs_scale.selection.gqa as gqa

    layout = DocumentLayout.build(DOCS, 10, "torch_varlen")
    assert layout.cu_seqlens.tolist() == [0, 4, 10, 13, 18, 20] and layout.max_len == 6
    assert DocumentLayout.build(DOCS, 3, "torch_varlen").allowed_B1TS is not None  # cached steps use the mask

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, window_size, enable_gqa):
        assert window_size == (-1, 0) and enable_gqa and max_q == max_k == 6
        parts = [F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=True,
                                                enable_gqa=True).transpose(0, 1)
                 for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True)]
        return torch.cat(parts)

    monkeypatch.setattr(gqa, "varlen_attn", varlen_attn, raising=False)
    monkeypatch.setattr(gqa, "_VARLEN_PARAMS", {"window_size": None, "enable_gqa": None}, raising=False)
    torch.manual_seed(0)
    attn = GQASelectedAttention(D, H, G, d, candidates=R)
    choice = HeadSelector(K, 1, H * R, H, strategy="subset", partitions=G).train()()[0]
    x = torch.randn(2, 10, D)
    cos, sin = rope_tables(positions_in_documents(DOCS), d, 10000.0, x.dtype)
    tokens = TaskSegments(TASKS.reshape(-1))
    got = attn(x, cos, sin, layout, choice, tokens)
    want = attn(x, cos, sin, DocumentLayout.build(DOCS, 10, "sdpa"), choice, tokens)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 50, DOCS.shape, generator=torch.Generator().manual_seed(4))
    grads = []
    for recompute in (False, True):
        model = tiny_lm("subset").train()
        model.checkpoint_activations = recompute
        model(ids, task_BL=TASKS, doc_ids_BL=DOCS).logsumexp(-1).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-6, msg=name)
