"""Attention kernels over the H selected heads. None of them ever sees the pool.

Legend: B batch, H heads, T query length, S key length, d head dim.
Inputs are q_BHTd, k_BHSd, v_BHSd and an optional boolean `allowed_BTS` (True = may attend; broadcast over
heads). `causal_offset` is the number of cached keys before the first query (bottom-right aligned causal mask).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # optional GPU kernel (pip install hs-scale[gpu])
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    HAVE_FLASH_ATTN = True
except ImportError:  # CPU machines: flash-attn cannot even be built without CUDA
    HAVE_FLASH_ATTN = False

BACKENDS = ("sdpa", "eager", "flash")


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


def flash_attention(q, k, v, key_padding_mask_BS, causal, dropout_p) -> Tensor:
    """flash-attn on CUDA (fp16/bf16). Padded keys go through the varlen kernel with per-sequence key lengths.

    NOTE: with causal=True the key padding mask is dropped. Sequences are right-padded, so a causal query at a
    real position never reaches a padded key; only the rows of padded queries differ (they are never used), and
    flash-attn's varlen causal mask is aligned to each sequence's own key length, which would be wrong there.
    """
    B, H, T, d = q.shape
    q_BTHd, k_BSHd, v_BSHd = (t.transpose(1, 2) for t in (q, k, v))
    if key_padding_mask_BS is None or causal:
        out = flash_attn_func(q_BTHd, k_BSHd, v_BSHd, dropout_p=dropout_p, causal=causal)
        return out.transpose(1, 2)
    keep_BS = ~key_padding_mask_BS
    k_lens = keep_BS.sum(dim=1, dtype=torch.int32)
    cu_k = F.pad(k_lens.cumsum(0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=q.device)
    out = flash_attn_varlen_func(
        q_BTHd.reshape(B * T, H, d),
        k_BSHd[keep_BS],
        v_BSHd[keep_BS],
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=T,
        max_seqlen_k=int(k_lens.max()),
        dropout_p=dropout_p,
    )
    return out.view(B, T, H, d).transpose(1, 2)


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel actually used: "flash" falls back to SDPA off CUDA, in fp32, or without flash-attn."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; use one of {BACKENDS}")
    if name == "flash" and not (HAVE_FLASH_ATTN and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)):
        return "sdpa"
    return name


KERNELS = {"sdpa": sdpa_attention, "eager": eager_attention, "flash": flash_attention}
