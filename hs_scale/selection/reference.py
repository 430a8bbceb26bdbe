"""Eager reference of head selection: compute all H' heads, then gather the selected ones.

This is the public reference code's semantics with its defects fixed (subset slots in ascending head order,
deterministic evaluation, per-sample task). It is deliberately written independently of selector.py and
attention.py - loops and explicit formulas, no shared helpers - so that the tests comparing the two can fail.
It costs about H'/H times the attention of a dense layer; `benchmarks/attention.py` measures exactly that.

Legend: B batch, T query length, S key length, D width, P = H' pool heads, H slots, d head dim, K tasks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hs_scale.selection.attention import SelectedHeadAttention


def reference_selection(
    logits_KP: Tensor, noise_KP: Tensor | None, H: int, strategy: str, tau: float
) -> tuple[list[list[int]], Tensor]:
    """(heads[k] = pool heads in slot order, straight-through weights [K, H]) from explicit per-task loops."""
    K, P = logits_KP.shape
    z = logits_KP if noise_KP is None else logits_KP + noise_KP
    s = 1.0 / (1.0 + torch.exp(-z / tau))
    heads, weights = [], []
    for k in range(K):
        values = s[k].detach().tolist()
        if strategy == "group":
            r = P // H
            chosen = [g * r + max(range(r), key=lambda j, g=g: (values[g * r + j], -j)) for g in range(H)]
        else:
            ranked = sorted(range(P), key=lambda h: (-values[h], h))
            chosen = sorted(ranked[:H])
        heads.append(chosen)
        picked = torch.stack([s[k, h] for h in chosen])
        weights.append(1.0 + picked - picked.detach())
    return heads, torch.stack(weights)


def reference_attention(
    layer: SelectedHeadAttention,
    x_BTD: Tensor,
    heads: list[list[int]] | None,
    weights_KH: Tensor | None,
    task_B: Tensor | None,
    memory_BSD: Tensor | None = None,
    key_padding_mask_BS: Tensor | None = None,
    causal: bool = False,
) -> Tensor:
    """All P heads projected and attended with an explicit softmax, then per-sample gather and slot weights.

    heads=None means dense (all heads, weight 1). Uses `layer`'s parameters, so gradients can be compared.
    """
    B, T, _ = x_BTD.shape
    P, d, H = layer.pool_heads, layer.head_dim, layer.num_heads
    kv_src = x_BTD if memory_BSD is None else memory_BSD
    S = kv_src.shape[1]

    def split(y):  # [B, L, P*d] -> [B, P, L, d]
        return y.view(B, -1, P, d).permute(0, 2, 1, 3)

    q, k, v = split(layer.q_proj(x_BTD)), split(layer.k_proj(kv_src)), split(layer.v_proj(kv_src))
    scores = torch.einsum("bptd,bpsd->bpts", q, k) / math.sqrt(d)
    allowed = torch.ones(B, 1, T, S, dtype=torch.bool, device=x_BTD.device)
    if causal and memory_BSD is None:
        allowed = allowed & torch.ones(T, S, dtype=torch.bool, device=x_BTD.device).tril(S - T)
    if key_padding_mask_BS is not None:
        allowed = allowed & ~key_padding_mask_BS[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    out_BPTd = torch.einsum("bpts,bpsd->bptd", probs, v)

    rows = []
    for b in range(B):
        if heads is None:
            rows.append(out_BPTd[b])
            continue
        task = int(task_B[b]) if task_B is not None else 0
        slots = [out_BPTd[b, h] * weights_KH[task, slot] for slot, h in enumerate(heads[task])]
        rows.append(torch.stack(slots))
    out_BHTd = torch.stack(rows)
    return layer.out_proj(out_BHTd.permute(0, 2, 1, 3).reshape(B, T, H * d))
