"""On CUDA in bf16: selected-head attention (every backend this machine has) == the fp32 compute-all-H'-then-gather
reference, in values and gradients; the fused kernels == SDPA; the grouped projection == the per-task loop.

bf16 keeps 8 bits of mantissa: values are compared with atol/rtol 3e-2 after the fp32 reference, gradients by
their relative error norm ||a - b|| / ||b|| <= 3e-2 (elementwise tolerances are meaningless on gradients that
sum over thousands of bf16 products). k_proj.bias is left out of gradient checks: its exact gradient is zero
(softmax is shift-invariant per query), so both sides hold only rounding noise.
"""

from __future__ import annotations

import pytest
import torch

from hs_scale.selection import backends
from hs_scale.selection.attention import SelectedHeadAttention, TaskSegments
from hs_scale.selection.backends import KERNELS, resolve_backend
from hs_scale.selection.reference import reference_attention
from hs_scale.selection.selector import HeadSelector

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu/run.sh runs it)"),
]

D, H, P, K = 256, 4, 8, 3  # head dim 64: every fused kernel takes it
B, T, S = 6, 33, 47  # odd lengths on purpose
VALUE_TOL = dict(atol=3e-2, rtol=3e-2)
GRAD_REL = 3e-2


def _backends() -> list[str]:
    names = ["sdpa", "auto"]
    if backends.torch_varlen_works():
        names.append("torch_varlen")
    if backends.HAVE_FLASH_ATTN:
        names.append("flash")
    return names


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def _checked(layer: SelectedHeadAttention, *tensors: torch.Tensor) -> tuple[list[str], list[torch.Tensor]]:
    """Names and tensors whose gradients are compared: the given inputs and every parameter but k_proj.bias."""
    params = [(n, p) for n, p in layer.named_parameters() if n != "k_proj.bias"]
    return [f"input{i}" for i in range(len(tensors))] + [n for n, _ in params], [*tensors, *(p for _, p in params)]


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    layer = SelectedHeadAttention(D, H, P).cuda()
    selector = HeadSelector(K, 1, P, H, strategy="subset", temperature=1.0, seed=seed).cuda()
    selector.train()
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(B, T, D, device="cuda", generator=g, requires_grad=True)
    memory = torch.randn(B, S, D, device="cuda", generator=g, requires_grad=True)
    return layer, selector, x, memory


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("kind", ["self", "causal", "cross"])
@pytest.mark.parametrize("mixed", [False, True])
def test_bf16_matches_fp32_reference(backend, kind, mixed):
    layer, selector, x, memory = _setup()
    layer.backend = backend
    cross = kind == "cross"
    L = S if cross else T
    lengths = torch.tensor([L, L - 5, L - 1, 7, L, L - 20], device="cuda")
    mask = torch.arange(L, device="cuda")[None, :] >= lengths[:, None]
    task = torch.tensor([2, 0, 2, 1, 0, 1] if mixed else [1] * B, device="cuda")
    mem = memory if cross else None
    choice = selector()[0]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(x, choice=choice, task_B=task, memory_BSD=mem, key_padding_mask_BS=mask, causal=kind == "causal")
    assert out.dtype == torch.bfloat16
    ref = reference_attention(layer, x, choice.heads.tolist(), choice.weights, task, mem, mask, kind == "causal")
    # Padded query rows of causal self-attention are never used (the varlen kernels return zeros there).
    rows = ~mask if kind == "causal" else torch.ones(B, T, dtype=torch.bool, device="cuda")
    torch.testing.assert_close(out.float()[rows], ref[rows], **VALUE_TOL)
    grad_out = torch.randn_like(ref) * rows[:, :, None]
    names, wrt = _checked(layer, x, selector.logits, *([memory] if cross else []))
    ours = torch.autograd.grad((out.float() * grad_out).sum(), wrt, retain_graph=True)
    theirs = torch.autograd.grad((ref * grad_out).sum(), wrt)
    for name, a, b in zip(names, ours, theirs, strict=True):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) <= GRAD_REL, (name, rel_err(a, b))


@pytest.mark.parametrize("backend", [b for b in _backends() if b in ("torch_varlen", "flash")])
@pytest.mark.parametrize("causal", [False, True])
def test_fused_kernel_matches_sdpa(backend, causal):
    """The fused varlen path and SDPA's path on the same bf16 q/k/v (padded keys), forward and backward."""
    assert resolve_backend(backend, torch.device("cuda"), torch.bfloat16) == backend
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, T, 64, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    lengths = torch.tensor([T, 3, T - 1, 20, T, 9], device="cuda")
    mask = torch.arange(T, device="cuda")[None, :] >= lengths[:, None]
    rows = (~mask if causal else torch.ones_like(mask))[:, None, :, None]
    outs, grads = {}, {}
    for name in (backend, "sdpa"):
        out = KERNELS[name](q, k, v, mask, causal, 0.0)
        outs[name] = out * rows
        grads[name] = torch.autograd.grad((outs[name].float() ** 2).sum(), (q, k, v))
    torch.testing.assert_close(outs[backend], outs["sdpa"], atol=2e-2, rtol=2e-2)
    for a, b in zip(grads[backend], grads["sdpa"], strict=True):
        assert rel_err(a, b) <= GRAD_REL


def test_auto_backend_is_a_fused_kernel_on_hopper():
    chosen = resolve_backend("auto", torch.device("cuda"), torch.bfloat16)
    assert chosen in ("flash", "torch_varlen", "sdpa")
    if backends.torch_varlen_works() or backends.HAVE_FLASH_ATTN:
        assert chosen != "sdpa"
    assert backends.HAVE_TORCH_VARLEN  # torch >= 2.10 has it: the probe above decides whether it is used


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm")
def test_grouped_projection_matches_loop_on_cuda():
    """Mixed-task batch, bf16 autocast: one grouped GEMM == the per-task loop (values, every gradient)."""
    layer, selector, x, memory = _setup()
    task = torch.tensor([2, 0, 2, 0, 0, 2], device="cuda")  # task 1 of the choice is not in the batch
    segments = TaskSegments(task)
    choice = selector()[0]
    assert layer._use_grouped(x.bfloat16())  # what "auto" picks on CUDA in bf16
    results = {}
    for mode in ("loop", "grouped"):
        layer.mixed_projection = mode
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(x, choice=choice, task_B=segments, memory_BSD=memory)
        names, wrt = _checked(layer, x, memory, selector.logits)
        results[mode] = (out, torch.autograd.grad(out.float().square().sum(), wrt, retain_graph=True))
    torch.testing.assert_close(results["grouped"][0], results["loop"][0], atol=2e-2, rtol=2e-2)
    for name, a, b in zip(names, results["grouped"][1], results["loop"][1], strict=True):
        assert rel_err(a, b) <= GRAD_REL, (name, rel_err(a, b))
