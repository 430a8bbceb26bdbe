"""Selected-head attention == the compute-all-H'-then-gather reference, in values and gradients (fp32, 1e-5)."""

from __future__ import annotations

import itertools

import pytest
import torch

from hs_scale.selection.attention import SelectedHeadAttention, TaskSegments
from hs_scale.selection.reference import reference_attention, reference_selection
from hs_scale.selection.selector import HeadSelector, selection_noise

D, H, P, K = 32, 4, 8, 3
TOL = dict(atol=1e-5, rtol=1e-5)


def _setup(strategy: str, training: bool, seed: int = 0):
    torch.manual_seed(seed)
    layer = SelectedHeadAttention(D, H, P)
    selector = HeadSelector(K, 1, P, H, strategy=strategy, temperature=1.0, seed=seed)
    selector.train(training)
    return layer, selector


def _inputs(mixed: bool, cross: bool, padded: bool, B: int = 5, T: int = 6, S: int = 7):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, D, generator=gen, requires_grad=True)
    memory = torch.randn(B, S, D, generator=gen, requires_grad=True) if cross else None
    task = torch.tensor([2, 0, 2, 1, 0]) if mixed else torch.full((B,), 1)
    L = S if cross else T
    mask = None
    if padded:
        lengths = torch.tensor([L, L - 2, L - 1, L, 3])
        mask = torch.arange(L)[None, :] >= lengths[:, None]
    return x, memory, task, mask


def _grads(outputs, tensors):
    return torch.autograd.grad(outputs, tensors, allow_unused=True)


CASES = list(
    itertools.product(["group", "subset"], [False, True], ["self", "causal", "cross"], [False, True], [True, False])
)


@pytest.mark.parametrize("strategy,mixed,kind,padded,training", CASES)
def test_matches_reference(strategy, mixed, kind, padded, training):
    layer, selector = _setup(strategy, training)
    x, memory, task, mask = _inputs(mixed, kind == "cross", padded)
    causal = kind == "causal"

    noise = selection_noise(selector.seed, 0, 0, K, P) if training else None
    choice = selector()[0]
    ref_heads, ref_weights = reference_selection(selector.logits[:, 0], noise, H, strategy, 1.0)
    assert choice.heads.tolist() == ref_heads
    assert torch.equal(choice.weights.detach(), torch.ones(K, H))

    out = layer(x, choice=choice, task_B=task, memory_BSD=memory, key_padding_mask_BS=mask, causal=causal)
    ref = reference_attention(layer, x, ref_heads, ref_weights, task, memory, mask, causal)
    torch.testing.assert_close(out, ref, **TOL)

    grad_out = torch.randn_like(out)
    wrt = [x, selector.logits, *layer.parameters()] + ([memory] if memory is not None else [])
    ours = _grads((out * grad_out).sum(), wrt)
    theirs = _grads((ref * grad_out).sum(), wrt)
    names = ["x", "logits", "q.w", "q.b", "k.w", "k.b", "v.w", "v.b", "o.w", "o.b", "mem"][: len(wrt)]
    for name, a, b in zip(names, ours, theirs, strict=True):
        assert a is not None and b is not None, name
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"grad {name}: {m}")
    if training:  # the logits of selected heads of the tasks present get gradient, nothing else
        grad = ours[1][:, 0]
        for k in range(K):
            used = set(ref_heads[k]) if k in task.tolist() else set()
            for h in range(P):
                assert (grad[k, h] != 0) == (h in used), (k, h)


@pytest.mark.parametrize("strategy", ["group", "subset"])
@pytest.mark.parametrize("mixed", [False, True])
def test_cached_incremental_decoding_matches_full(strategy, mixed):
    """Self (causal) and cross attention decoded step by step through the KV cache == one full pass."""
    layer, selector = _setup(strategy, training=False)
    layer.eval()
    x, memory, task, mem_mask = _inputs(mixed, cross=True, padded=True)
    x = x.detach()
    choice = selector()[0]
    segments = TaskSegments(task)
    with torch.no_grad():
        full_self = layer(x, choice=choice, task_B=segments, causal=True)
        full_cross = layer(x, choice=choice, task_B=segments, memory_BSD=memory, key_padding_mask_BS=mem_mask)
        self_cache, cross_cache, steps_self, steps_cross = {}, {}, [], []
        for t in range(x.shape[1]):
            x_t = x[:, t : t + 1]
            steps_self.append(layer(x_t, choice=choice, task_B=segments, causal=True, cache=self_cache))
            steps_cross.append(
                layer(x_t, choice=choice, task_B=segments, memory_BSD=memory, key_padding_mask_BS=mem_mask,
                      cache=cross_cache)
            )
    torch.testing.assert_close(torch.cat(steps_self, 1), full_self, **TOL)
    torch.testing.assert_close(torch.cat(steps_cross, 1), full_cross, **TOL)
    assert self_cache["k"].shape == (x.shape[0], H, x.shape[1], D // H)  # only the selected heads are cached
    assert cross_cache["k"].shape == (x.shape[0], H, memory.shape[1], D // H)


def test_chunked_prefill_then_steps():
    """A multi-token chunk on top of a cache uses a bottom-right aligned causal mask."""
    layer, selector = _setup("group", training=False)
    x, _, task, _ = _inputs(True, cross=False, padded=False)
    x = x.detach()
    choice = selector()[0]
    with torch.no_grad():
        full = layer(x, choice=choice, task_B=task, causal=True)
        cache = {}
        a = layer(x[:, :4], choice=choice, task_B=task, causal=True, cache=cache)
        b = layer(x[:, 4:], choice=choice, task_B=task, causal=True, cache=cache)
    torch.testing.assert_close(torch.cat([a, b], 1), full, **TOL)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_backends_agree(backend):
    layer, selector = _setup("group", training=True)
    layer.backend = backend
    x, memory, task, mask = _inputs(True, cross=True, padded=True)
    torch.manual_seed(0)
    choice = selector()[0]
    out = layer(x, choice=choice, task_B=task, memory_BSD=memory, key_padding_mask_BS=mask)
    layer.backend = "eager"
    ref = layer(x, choice=choice, task_B=task, memory_BSD=memory, key_padding_mask_BS=mask)
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attn backend needs a CUDA device")
def test_flash_backend_matches_sdpa_on_gpu():
    pytest.importorskip("flash_attn", reason="flash-attn is not installed (pip install hs-scale[gpu])")
    layer, selector = _setup("group", training=False)
    layer = layer.cuda().to(torch.bfloat16)
    selector = selector.cuda()
    x, memory, task, mask = _inputs(True, cross=True, padded=True)
    x, memory, mask, task = x.detach().cuda().bfloat16(), memory.detach().cuda().bfloat16(), mask.cuda(), task.cuda()
    choice = selector()[0]
    outs = {}
    for backend in ("flash", "sdpa"):
        layer.backend = backend
        outs[backend] = layer(x, choice=choice, task_B=task, memory_BSD=memory, key_padding_mask_BS=mask)
    torch.testing.assert_close(outs["flash"], outs["sdpa"], atol=2e-2, rtol=2e-2)
