"""Attention kernels over the H selected heads. None of them ever sees the pool.

Legend: B batch, H heads, T query length, S key length, d head dim, N packed tokens.
Inputs are q_BHTd, k_BHSd, v_BHSd and an optional boolean `key_padding_mask_BS` (True = padded key).
`causal` masks are bottom-right aligned (the S - T cached keys come before the first query).

Backends (`model.attention_backend`):
  sdpa          torch SDPA. Unmasked or plain causal: SDPA picks its fused kernel (flash / memory-efficient on
                CUDA); padded keys: a boolean mask (the memory-efficient kernel on CUDA).
  eager         softmax(q k^T / sqrt(d)) v written out: the reference every other backend is tested against.
  flash         the flash-attn package: dense kernel when nothing is padded, its varlen kernel over packed
                tokens otherwise. Without flash-attn it falls back like "auto".
  torch_varlen  torch.nn.attention.varlen (PyTorch's own flash kernel over packed tokens) for padded batches,
                SDPA otherwise (which runs the same flash kernel when nothing is padded).
  auto          on CUDA in bf16/fp16: flash if importable, else torch_varlen if this torch has it, else sdpa;
                sdpa everywhere else.
The choice is made once per (requested backend, device type, dtype) and logged.

Packing (the varlen backends): padded keys are dropped and the rest concatenated ([N, H, d] with cumulative
sequence offsets). Non-causal attention keeps all T queries of every row (cross-attention knows no query mask);
causal self-attention (T == S) packs the queries with the same mask, so each real query sees exactly the real
keys up to itself whatever the padding side, and padded query rows come back as zeros (they are never used).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

try:  # optional GPU kernel (pip install hs-scale[gpu])
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    HAVE_FLASH_ATTN = True
except ImportError:  # CPU machines: flash-attn cannot even be built without CUDA
    HAVE_FLASH_ATTN = False

try:  # PyTorch >= 2.10: its flash kernel over packed sequences (CUDA only)
    from torch.nn.attention.varlen import varlen_attn

    HAVE_TORCH_VARLEN = True
    # 2.10/2.11 take is_causal=; later versions express causality as window_size=(-1, 0).
    _VARLEN_HAS_IS_CAUSAL = "is_causal" in inspect.signature(varlen_attn).parameters
except ImportError:
    HAVE_TORCH_VARLEN = False

BACKENDS = ("sdpa", "eager", "flash", "torch_varlen", "auto")

# (q_NHd, k_NHd, v_NHd, cu_q, cu_k, max_q, max_k, causal, dropout_p) -> out_NHd
VarlenFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, int, int, bool, float], Tensor]


def attention_mask(
    key_padding_mask_BS: Tensor | None, T: int, S: int, causal: bool, device: torch.device
) -> Tensor | None:
    """Boolean mask [B or 1, 1, T, S], True where attention is allowed; None when nothing is masked."""
    allowed = None
    if causal:
        q_pos = torch.arange(T, device=device)[:, None] + (S - T)
        allowed = (torch.arange(S, device=device)[None, :] <= q_pos)[None, None]
    if key_padding_mask_BS is not None:
        keep = ~key_padding_mask_BS[:, None, None, :]
        allowed = keep if allowed is None else allowed & keep
    return allowed


def sdpa_attention(q, k, v, key_padding_mask_BS, causal, dropout_p) -> Tensor:
    T, S = q.shape[-2], k.shape[-2]
    if key_padding_mask_BS is None and (not causal or T == S):
        # Unmasked or plain causal: let SDPA pick its fused kernel.
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal and T > 1)
    mask = attention_mask(key_padding_mask_BS, T, S, causal, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def eager_attention(q, k, v, key_padding_mask_BS, causal, dropout_p) -> Tensor:
    """softmax(q k^T / sqrt(d)) v written out: the reference every other backend is tested against."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    mask = attention_mask(key_padding_mask_BS, q.shape[-2], k.shape[-2], causal, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v


# --- packing for the varlen kernels ------------------------------------------------------------------------------


def flatten_tokens(x_BHLd: Tensor) -> Tensor:
    """[B*L, H, d]: every row's tokens one after the other."""
    B, H, L, d = x_BHLd.shape
    return x_BHLd.transpose(1, 2).reshape(B * L, H, d)


def packing(keep_BL: Tensor) -> tuple[Tensor, Tensor, int]:
    """Flat indices [N] of the kept tokens, cumulative offsets int32 [B+1], longest row (one host sync)."""
    lengths_B = keep_BL.sum(dim=1, dtype=torch.int32)
    index_N = keep_BL.reshape(-1).nonzero().squeeze(1)
    return index_N, F.pad(lengths_B.cumsum(0, dtype=torch.int32), (1, 0)), int(lengths_B.max())


def unpack(out_NHd: Tensor, index_N: Tensor | None, B: int, L: int) -> Tensor:
    """[B, H, L, d] from packed tokens (index_N None: nothing was dropped); dropped tokens come back as zeros."""
    H, d = out_NHd.shape[1:]
    if index_N is not None:
        out_NHd = out_NHd.new_zeros(B * L, H, d).index_copy(0, index_N, out_NHd)
    return out_NHd.view(B, L, H, d).transpose(1, 2)


def varlen_attention(q, k, v, key_padding_mask_BS, causal, dropout_p, varlen_fn: VarlenFn) -> Tensor:
    """Attention of a padded batch through a varlen kernel over packed tokens (module docstring, "Packing")."""
    B, _, T, _ = q.shape
    S = k.shape[2]
    if causal and T != S:  # a padded cache plus a multi-token chunk: no packing keeps that alignment
        return sdpa_attention(q, k, v, key_padding_mask_BS, causal, dropout_p)
    index_k, cu_k, max_k = packing(~key_padding_mask_BS)
    k_NHd, v_NHd = flatten_tokens(k).index_select(0, index_k), flatten_tokens(v).index_select(0, index_k)
    if causal:  # self-attention: queries are the same tokens as the keys
        q_NHd, cu_q, max_q, index_q = flatten_tokens(q).index_select(0, index_k), cu_k, max_k, index_k
    else:  # every query row is kept
        q_NHd, max_q, index_q = flatten_tokens(q), T, None
        cu_q = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=q.device)
    out_NHd = varlen_fn(q_NHd, k_NHd, v_NHd, cu_q, cu_k, max_q, max_k, causal, dropout_p)
    return unpack(out_NHd, index_q, B, T)


def _flash_attn_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, dropout_p):
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                                  max_seqlen_k=max_k, dropout_p=dropout_p, causal=causal)


def _torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, dropout_p):
    if dropout_p:
        raise ValueError("torch varlen attention has no dropout (torch_varlen_attention routes it to SDPA)")
    if _VARLEN_HAS_IS_CAUSAL:
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=causal)
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, 0) if causal else (-1, -1))


def flash_attention(q, k, v, key_padding_mask_BS, causal, dropout_p) -> Tensor:
    """flash-attn on CUDA (fp16/bf16): the dense kernel (bottom-right causal, like ours) or varlen when padded."""
    if key_padding_mask_BS is None:
        out = flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), dropout_p=dropout_p, causal=causal)
        return out.transpose(1, 2)
    return varlen_attention(q, k, v, key_padding_mask_BS, causal, dropout_p, _flash_attn_varlen)


def torch_varlen_attention(q, k, v, key_padding_mask_BS, causal, dropout_p) -> Tensor:
    """PyTorch's varlen flash kernel for padded batches; SDPA when nothing is padded or with attention dropout."""
    if key_padding_mask_BS is None or dropout_p > 0:
        return sdpa_attention(q, k, v, key_padding_mask_BS, causal, dropout_p)
    return varlen_attention(q, k, v, key_padding_mask_BS, causal, dropout_p, _torch_varlen)


# --- choosing a backend --------------------------------------------------------------------------------------------


def available_kernels(device: torch.device | None = None) -> dict:
    """What this process could run: the facts `resolve_backend` decides on (also printed by the GPU check)."""
    cuda = torch.cuda.is_available() if device is None else device.type == "cuda" and torch.cuda.is_available()
    facts = {
        "flash_attn_package": HAVE_FLASH_ATTN,
        "torch_varlen_importable": HAVE_TORCH_VARLEN,
        "torch_varlen_works": torch_varlen_works() if cuda else False,
        "torch_grouped_mm": hasattr(torch, "_grouped_mm"),
        "cuda": cuda,
    }
    if cuda:
        cb = torch.backends.cuda
        facts.update(
            sdpa_flash=getattr(cb, "is_flash_attention_available", lambda: None)() and cb.flash_sdp_enabled(),
            sdpa_mem_efficient=cb.mem_efficient_sdp_enabled(),
            sdpa_cudnn=getattr(cb, "cudnn_sdp_enabled", lambda: None)(),
        )
    return facts


@functools.cache
def torch_varlen_works() -> bool:
    """torch.nn.attention.varlen is importable and runs forward + backward on this CUDA device in bf16.

    Probed once (milliseconds): the API is young and its backward or this GPU's kernel may be missing; then the
    choice falls back to SDPA instead of failing in the middle of training.
    """
    if not (HAVE_TORCH_VARLEN and torch.cuda.is_available()):
        return False
    return passes_probe(_probe_torch_varlen, "torch.nn.attention.varlen is present but failed a forward/backward "
                                             "probe (%s); using SDPA")


def passes_probe(probe: Callable[[], None], warning: str) -> bool:
    """True when `probe()` raises nothing; otherwise log `warning % error` and return False.

    The first forward may run under no_grad / inference_mode (evaluation): the probe needs autograd.
    """
    try:
        with torch.inference_mode(False), torch.enable_grad():
            probe()
    except Exception as err:  # noqa: BLE001 - any failure means "do not use it"
        log.warning(warning, err)
        return False
    return True


def _probe_torch_varlen() -> None:
    q = torch.randn(8, 1, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cu = torch.tensor([0, 3, 8], device="cuda", dtype=torch.int32)
    _torch_varlen(q, q, q, cu, cu, 5, 5, True, 0.0).float().sum().backward()
    torch.cuda.synchronize()


@functools.cache
def _choose(name: str, device_type: str, dtype: torch.dtype) -> tuple[str, str]:
    fused_ok = device_type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if name in ("sdpa", "eager"):
        return name, "as configured"
    if name == "flash" and fused_ok and HAVE_FLASH_ATTN:
        return "flash", "flash-attn is importable"
    if not fused_ok:
        return "sdpa", f"fused varlen kernels need CUDA and bf16/fp16 (have {device_type}, {dtype})"
    if name == "torch_varlen" and torch_varlen_works():
        return "torch_varlen", "as configured"
    if name != "torch_varlen" and HAVE_FLASH_ATTN:
        return "flash", "flash-attn is importable"
    if torch_varlen_works():
        return "torch_varlen", "flash-attn is not installed; torch.nn.attention.varlen works"
    return "sdpa", "neither flash-attn nor a working torch.nn.attention.varlen"


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel actually used for `name` on this device and dtype (module docstring); chosen once, logged."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; use one of {BACKENDS}")
    first = _choose.cache_info().currsize
    chosen, why = _choose(name, device.type, dtype)
    if _choose.cache_info().currsize > first:
        log.info("attention backend %r on %s/%s -> %s (%s)", name, device.type, dtype, chosen, why)
    return chosen


KERNELS = {
    "sdpa": sdpa_attention,
    "eager": eager_attention,
    "flash": flash_attention,
    "torch_varlen": torch_varlen_attention,
}
