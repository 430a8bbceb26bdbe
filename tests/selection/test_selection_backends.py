"""Attention backends on CPU: the varlen packing / masking / un-packing, the backend choice, and the grouped
projection of mixed-task batches, each against the eager reference (values and gradients).

The varlen kernels themselves (flash-attn, torch.nn.attention.varlen) run only on CUDA; here they are replaced by
`eager_varlen`, a per-sequence softmax written out, so everything around the kernel is checked on CPU. tests/gpu
runs the real kernels.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from hs_scale.selection import attention, backends
from hs_scale.selection.attention import SelectedHeadAttention, TaskSegments
from hs_scale.selection.backends import eager_attention, resolve_backend, varlen_attention
from hs_scale.selection.reference import reference_attention
from hs_scale.selection.selector import HeadSelector

TOL = dict(atol=1e-5, rtol=1e-5)


def eager_varlen(q_NHd, k_NHd, v_NHd, cu_q, cu_k, max_q, max_k, causal, dropout_p):
    """The varlen kernels' contract, written out: sequence i is q[cu_q[i]:cu_q[i+1]] against k/v[cu_k[i]:cu_k[i+1]],
    causal bottom-right aligned (flash-attn's convention for unequal lengths)."""
    assert dropout_p == 0 and cu_q.dtype == cu_k.dtype == torch.int32
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max()) and max_k == int((cu_k[1:] - cu_k[:-1]).max())
    outs = []
    for i in range(len(cu_q) - 1):
        q, k, v = q_NHd[cu_q[i] : cu_q[i + 1]], k_NHd[cu_k[i] : cu_k[i + 1]], v_NHd[cu_k[i] : cu_k[i + 1]]
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(q.shape[-1])
        if causal:
            T, S = q.shape[0], k.shape[0]
            allowed = torch.ones(T, S, dtype=torch.bool).tril(S - T)
            scores = scores.masked_fill(~allowed, float("-inf"))
        outs.append(torch.einsum("hts,shd->thd", scores.softmax(-1), v))
    return torch.cat(outs)


def _qkv(B=4, H=2, T=6, S=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, d, generator=g, requires_grad=True) for L in (T, S, S)]


def _padding(lengths, S):
    return torch.arange(S)[None, :] >= torch.tensor(lengths)[:, None]


@pytest.mark.parametrize(
    "kind,T,S,lengths",
    [
        ("self", 6, 6, [6, 3, 5, 1]),  # encoder self-attention, right padded
        ("cross", 4, 7, [7, 2, 5, 7]),  # decoder queries over padded memory
        ("causal", 6, 6, [6, 3, 5, 2]),  # decoder self-attention with padded targets
        ("causal_left", 6, 6, None),  # left padding: packing keeps order, so causal is still exact
    ],
)
def test_varlen_packing_matches_eager(kind, T, S, lengths):
    q, k, v = _qkv(T=T, S=S)
    causal = kind.startswith("causal")
    mask = _padding(lengths, S) if lengths else torch.arange(S)[None, :] < torch.tensor([0, 3, 1, 4])[:, None]
    out = varlen_attention(q, k, v, mask, causal, 0.0, eager_varlen)
    ref = eager_attention(q, k, v, mask, causal, 0.0)
    # Causal self-attention packs the queries too: padded query rows come back as zeros (they are never used);
    # the reference computes something there. Compare the real rows, and check the padded ones are zeros.
    real_BT = ~mask if causal else torch.ones(q.shape[0], T, dtype=torch.bool)
    real = real_BT[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[real], ref[real], **TOL)
    assert torch.equal(out[~real], torch.zeros_like(out[~real]))
    if lengths is None:  # left padding: the reference's fully masked rows are NaN, and so are its gradients
        return
    grad_out = torch.randn_like(out) * real
    ours = torch.autograd.grad((out * grad_out).sum(), (q, k, v))
    theirs = torch.autograd.grad((ref * grad_out).sum(), (q, k, v))
    for name, a, b in zip("qkv", ours, theirs, strict=True):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"grad {name}: {m}")


def test_varlen_chunk_on_padded_cache_falls_back_to_masked_sdpa():
    """causal with T < S (a chunk after cached keys) has no packing that keeps the alignment: SDPA + mask."""
    q, k, v = _qkv(T=2, S=6)
    mask = _padding([6, 4, 5, 6], 6)

    def must_not_run(*args):
        raise AssertionError("the varlen kernel must not be called")

    out = varlen_attention(q, k, v, mask, True, 0.0, must_not_run)
    torch.testing.assert_close(out, eager_attention(q, k, v, mask, True, 0.0), **TOL)


def test_torch_varlen_backend_routes_unpadded_and_dropout_to_sdpa(monkeypatch):
    """Only padded batches without dropout go to the varlen kernel (torch's has no dropout)."""
    calls = []
    monkeypatch.setattr(backends, "_torch_varlen", lambda *a: calls.append(a) or eager_varlen(*a))
    q, k, v = _qkv()
    mask = _padding([6, 3, 5, 1], 6)
    out = backends.torch_varlen_attention(q, k, v, None, True, 0.0)
    torch.testing.assert_close(out, eager_attention(q, k, v, None, True, 0.0), **TOL)
    torch.manual_seed(0)
    backends.torch_varlen_attention(q, k, v, mask, False, 0.5)
    assert calls == []
    out = backends.torch_varlen_attention(q, k, v, mask, False, 0.0)
    assert len(calls) == 1
    torch.testing.assert_close(out, eager_attention(q, k, v, mask, False, 0.0), **TOL)


def test_flash_backend_layouts(monkeypatch):
    """flash_attention's transposes ([B, T, H, d] for flash-attn) and its varlen route, with the flash-attn
    functions replaced by written-out ones of the same contract."""

    def dense_flash(q_BTHd, k_BSHd, v_BSHd, dropout_p, causal):  # flash_attn_func's layout and causal convention
        out = eager_attention(*(t.transpose(1, 2) for t in (q_BTHd, k_BSHd, v_BSHd)), None, causal, dropout_p)
        return out.transpose(1, 2)

    monkeypatch.setattr(backends, "flash_attn_func", dense_flash, raising=False)
    monkeypatch.setattr(backends, "_flash_attn_varlen", eager_varlen)
    q, k, v = _qkv(T=4, S=6)
    for causal in (False, True):  # causal with T < S: bottom-right aligned, like the eager reference
        torch.testing.assert_close(backends.flash_attention(q, k, v, None, causal, 0.0),
                                   eager_attention(q, k, v, None, causal, 0.0), **TOL)
    mask = _padding([6, 2, 5, 4], 6)
    torch.testing.assert_close(backends.flash_attention(q, k, v, mask, False, 0.0),
                               eager_attention(q, k, v, mask, False, 0.0), **TOL)


@pytest.fixture
def fresh_choice(monkeypatch):
    """A clean backend-choice cache, restored afterwards (the choice is made once per process)."""
    backends._choose.cache_clear()
    yield monkeypatch
    backends._choose.cache_clear()


@pytest.mark.parametrize(
    "flash,varlen,name,device,dtype,want",  # varlen: torch's varlen kernel is there and passed its probe
    [
        (True, True, "auto", "cuda", torch.bfloat16, "flash"),
        (False, True, "auto", "cuda", torch.bfloat16, "torch_varlen"),
        (False, False, "auto", "cuda", torch.bfloat16, "sdpa"),  # e.g. its probe failed: SDPA, not a crash
        (True, True, "auto", "cuda", torch.float32, "sdpa"),  # no fused varlen kernel in fp32
        (True, True, "auto", "cpu", torch.bfloat16, "sdpa"),
        (False, True, "flash", "cuda", torch.float16, "torch_varlen"),  # flash without flash-attn: next best
        (True, True, "torch_varlen", "cuda", torch.bfloat16, "torch_varlen"),
        (True, False, "torch_varlen", "cuda", torch.bfloat16, "sdpa"),
        (True, True, "flash", "cpu", torch.float32, "sdpa"),
        (True, True, "eager", "cuda", torch.bfloat16, "eager"),
        (True, True, "sdpa", "cuda", torch.bfloat16, "sdpa"),
    ],
)
def test_backend_choice(fresh_choice, flash, varlen, name, device, dtype, want):
    fresh_choice.setattr(backends, "HAVE_FLASH_ATTN", flash)
    fresh_choice.setattr(backends, "torch_varlen_works", lambda: varlen)  # a CUDA probe in real runs
    assert resolve_backend(name, torch.device(device), dtype) == want


@pytest.mark.parametrize("fails", [False, True])
def test_torch_varlen_probe(monkeypatch, caplog, fails):
    """The once-per-process probe runs with autograd on even when the first forward is under inference_mode, and a
    failing probe means "not available" (with a warning), not a crash."""
    seen = []

    def probe():
        seen.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
        if fails:
            raise RuntimeError("no backward for this op")

    monkeypatch.setattr(backends, "HAVE_TORCH_VARLEN", True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "_probe_torch_varlen", probe)
    backends.torch_varlen_works.cache_clear()
    try:
        with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="hs_scale.selection.backends"):
            assert backends.torch_varlen_works() is not fails
            backends.torch_varlen_works()
    finally:
        backends.torch_varlen_works.cache_clear()
    assert seen == [(True, False)]  # once, with autograd
    assert ("failed a forward/backward probe (no backward for this op)" in caplog.text) is fails


def test_backend_choice_is_logged_once(fresh_choice, caplog):
    with caplog.at_level(logging.INFO, logger="hs_scale.selection.backends"):
        for _ in range(3):
            resolve_backend("auto", torch.device("cpu"), torch.float32)
    assert [r.getMessage() for r in caplog.records] == [
        "attention backend 'auto' on cpu/torch.float32 -> sdpa "
        "(fused varlen kernels need CUDA and bf16/fp16 (have cpu, torch.float32))"
    ]
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        resolve_backend("xformers", torch.device("cpu"), torch.float32)


# --- grouped projection of mixed-task batches -----------------------------------------------------------------------

D, H, P, K = 32, 4, 8, 3
grouped = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm")


def _layer_and_choice(strategy, seed=0):
    torch.manual_seed(seed)
    layer = SelectedHeadAttention(D, H, P)
    selector = HeadSelector(K, 1, P, H, strategy=strategy, temperature=1.0, seed=seed)
    selector.train()
    return layer, selector


@grouped
@pytest.mark.parametrize("strategy", ["group", "subset"])
@pytest.mark.parametrize("kind", ["self", "causal", "cross"])
def test_grouped_projection_matches_loop_and_reference(strategy, kind):
    """Values and gradients (inputs, selector logits, every parameter) of the grouped path == the per-task loop
    == the compute-all-then-gather reference; a task of the choice absent from the batch is fine."""
    layer, selector = _layer_and_choice(strategy)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, D, generator=g, requires_grad=True)
    memory = torch.randn(6, 7, D, generator=g, requires_grad=True) if kind == "cross" else None
    task = torch.tensor([2, 0, 2, 0, 0, 2])  # task 1 absent
    mask = _padding([7, 3, 6, 7, 2, 5], 7) if kind == "cross" else None
    choice = selector()[0]
    grad_out = torch.randn(6, 5, D, generator=g)
    wrt = [x, selector.logits, *layer.parameters()] + ([memory] if memory is not None else [])
    results = {}
    for mode in ("loop", "grouped"):
        layer.mixed_projection = mode
        out = layer(x, choice=choice, task_B=task, memory_BSD=memory, key_padding_mask_BS=mask,
                    causal=kind == "causal")
        results[mode] = (out, torch.autograd.grad((out * grad_out).sum(), wrt, retain_graph=True))
    ref = reference_attention(layer, x, choice.heads.tolist(), choice.weights, task, memory, mask, kind == "causal")
    torch.testing.assert_close(results["grouped"][0], ref, **TOL)
    torch.testing.assert_close(results["grouped"][0], results["loop"][0], **TOL)
    for i, (a, b) in enumerate(zip(results["grouped"][1], results["loop"][1], strict=True)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, i=i: f"grad {i}: {m}")


@grouped
def test_grouped_projection_under_bf16_autocast():
    """Autocast has no rule for _grouped_mm: the layer casts like F.linear would; bf16 tolerance vs the loop."""
    layer, selector = _layer_and_choice("group")
    x = torch.randn(4, 6, D)
    task = torch.tensor([1, 0, 1, 2])
    choice = selector()[0]
    outs = {}
    for mode in ("loop", "grouped"):
        layer.mixed_projection = mode
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[mode] = layer(x, choice=choice, task_B=TaskSegments(task), causal=True)
    assert outs["grouped"].dtype == outs["loop"].dtype == torch.bfloat16
    torch.testing.assert_close(outs["grouped"].float(), outs["loop"].float(), atol=2e-2, rtol=2e-2)


@grouped
def test_grouped_mm_probe(monkeypatch, caplog):
    """The probe's own reference (per-group matmuls, an empty group) holds where _grouped_mm runs (CPU here); a
    probe that raises means the loop, with a warning."""
    attention._probe_grouped_mm("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attention, "_probe_grouped_mm", lambda: torch.testing.assert_close(1.0, 2.0))
    attention.grouped_mm_works.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="hs_scale.selection.attention"):
            assert not attention.grouped_mm_supported(torch.device("cuda"), torch.bfloat16)
    finally:
        attention.grouped_mm_works.cache_clear()
    assert "torch._grouped_mm failed its probe" in caplog.text


def test_mixed_projection_auto_and_bad_value():
    layer, selector = _layer_and_choice("group")
    x = torch.randn(3, 4, D)
    assert not layer._use_grouped(x)  # auto: the loop on CPU
    layer.mixed_projection = "batched"
    with pytest.raises(ValueError, match="mixed_projection='batched' is unknown"):
        layer(x, choice=selector()[0], task_B=torch.tensor([0, 1, 0]))
