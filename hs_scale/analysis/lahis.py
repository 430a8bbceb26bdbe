"""LAHIS: language attention head importance scores (Liu et al., "Focusing on Language", AAAI 2026).

For a decoder-only LM with L layers and H query heads, a head mask m [L, H] multiplies each head's attention output
before the output projection (applied as a forward pre-hook on every ``self_attn.o_proj``: transformers 5 has no
``head_mask``). For the N documents x of one language, one forward and backward each at m = 1:

    LAHIS_l[i, h] = mean_x(|dL_x/dm_ih| * m_ih) * mean_x(1[dL_x/dm_ih * m_ih < 0])

with L_x the next-token cross-entropy averaged over the tokens of document x (truncated at ``max_tokens``).

What differs from the reference code (Linuxin-xxx/LAHIS), on purpose (docs/lahis.md):
- m stays fixed at 1 while scoring (the reference takes an AdamW step on m after every document, so its scores
  drift and depend on document order);
- the sums are accumulated in fp64 (the reference accumulates in bf16 and under-counts them);
- per-document gradients may be computed B documents at a time: each document gets its own copy of the mask
  (m is [B, L, H] inside the hook), so d(sum_b L_b)/dm_b = dL_b/dm_b exactly, one backward for B documents.

Legend: L layers, H query heads, D head dim, B documents in a batch, T tokens.
Works for Llama, Mistral, Qwen2, Gemma3 (text), Cohere: every model whose layers hold ``self_attn.o_proj`` fed with
the heads' outputs concatenated in head order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

Docs = Sequence[Sequence[int]]  # token ids, one list per document


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a transformers causal LM (``model.model.layers`` for every supported family)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None and hasattr(model, "get_decoder"):
        layers = getattr(model.get_decoder(), "layers", None)
    if layers is None or not all(hasattr(getattr(layer, "self_attn", None), "o_proj") for layer in layers):
        raise ValueError(f"{type(model).__name__}: no decoder layers with self_attn.o_proj found; LAHIS supports "
                         "Llama/Mistral/Qwen2/Gemma3/Cohere-style causal LMs")
    return layers


def head_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """(L layers, H query heads, D head dim), checked against the o_proj input width."""
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    layers = decoder_layers(model)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    width = layers[0].self_attn.o_proj.in_features
    if width != heads * head_dim:
        raise ValueError(f"o_proj takes {width} features, not num_attention_heads x head_dim = {heads} x {head_dim}")
    return len(layers), heads, head_dim


class HeadMask:
    """Scales each head's slice of every o_proj input by ``self.mask`` ([L, H], or [B, L, H] per document).

    Use as a context manager; the hooks are removed on exit. With ``mask`` all ones the logits are unchanged.
    """

    def __init__(self, model: torch.nn.Module, mask: torch.Tensor | None = None):
        self.num_layers, self.num_heads, self.head_dim = head_shape(model)
        self.model = model
        self.mask = torch.ones(self.num_layers, self.num_heads) if mask is None else mask
        self._handles: list = []

    def _hook(self, layer: int):
        def pre_hook(module, args):
            x_BTX = args[0]
            m = self.mask[..., layer, :]  # [H] or [B, H]
            scale = m.repeat_interleave(self.head_dim, dim=-1)  # [H*D] or [B, H*D]
            if scale.dim() == 2:
                scale = scale[:, None, :]
            return (x_BTX * scale.to(device=x_BTX.device, dtype=x_BTX.dtype), *args[1:])
        return pre_hook

    def __enter__(self) -> HeadMask:
        for i, layer in enumerate(decoder_layers(self.model)):
            self._handles.append(layer.self_attn.o_proj.register_forward_pre_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@contextmanager
def frozen(model: torch.nn.Module):
    """Parameters do not require grad inside (gradients flow only to the mask); restored on exit."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batches(docs: Docs, max_tokens: int, batch_size: int, pad_id: int, device):
    """Right-padded batches: ids [B, T], attention mask [B, T], loss weights [B, T-1] (1 on each doc's targets)."""
    docs = [list(d[:max_tokens]) for d in docs]
    for start in range(0, len(docs), batch_size):
        chunk = docs[start:start + batch_size]
        width = max(len(d) for d in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, d in enumerate(chunk):
            ids[b, :len(d)] = torch.tensor(d, dtype=torch.long)
            attn[b, :len(d)] = 1
        yield ids.to(device), attn.to(device), attn[:, 1:].to(device=device, dtype=torch.float32)


def _token_losses(model, ids_BT, attn_BT) -> torch.Tensor:
    """fp32 [B, T-1]: next-token cross-entropy at every position (pads included; weight them out)."""
    logits = model(input_ids=ids_BT, attention_mask=attn_BT).logits[:, :-1].float()
    return F.cross_entropy(logits.transpose(1, 2), ids_BT[:, 1:], reduction="none")


def _check_docs(docs: Docs, what: str) -> list[list[int]]:
    kept = [list(d) for d in docs if len(d) >= 2]
    if not kept:
        raise ValueError(f"{what}: no document has >= 2 tokens (a next-token loss needs at least one target)")
    return kept


def lahis_scores(model: torch.nn.Module, docs: Docs, max_tokens: int = 2048, batch_size: int = 1,
                 pad_id: int = 0) -> dict[str, torch.Tensor | int]:
    """LAHIS of one language's documents at m = 1.

    Returns ``scores`` fp64 [L, H] = ``mean_abs`` * ``frac_negative`` (both fp64 [L, H]) and ``documents`` (N).
    Documents shorter than 2 tokens are skipped. ``batch_size`` > 1 gives the same numbers (each document has its
    own mask copy) up to kernel rounding on padded batches.
    """
    docs = _check_docs(docs, "lahis_scores")
    L, H, _ = head_shape(model)
    sum_abs = torch.zeros(L, H, dtype=torch.float64)
    sum_neg = torch.zeros(L, H, dtype=torch.float64)
    was_training = model.training
    model.eval()
    with frozen(model), HeadMask(model) as hm:
        for ids, attn, w_BT in _batches(docs, max_tokens, batch_size, pad_id, _device(model)):
            m_BLH = torch.ones(ids.shape[0], L, H, device=ids.device, requires_grad=True)
            hm.mask = m_BLH
            per_doc = (_token_losses(model, ids, attn) * w_BT).sum(1) / w_BT.sum(1)  # [B]: mean over own tokens
            (g_BLH,) = torch.autograd.grad(per_doc.sum(), m_BLH)
            gm = (g_BLH * m_BLH.detach()).double().cpu()
            sum_abs += gm.abs().sum(0)
            sum_neg += (gm < 0).double().sum(0)
    model.train(was_training)
    n = len(docs)
    mean_abs, frac_neg = sum_abs / n, sum_neg / n
    return {"scores": mean_abs * frac_neg, "mean_abs": mean_abs, "frac_negative": frac_neg, "documents": n}


@torch.no_grad()
def mean_loss(model: torch.nn.Module, docs: Docs, mask: torch.Tensor | None = None, max_tokens: int = 2048,
              batch_size: int = 8, pad_id: int = 0) -> float:
    """Token-weighted mean next-token cross-entropy over docs, with head mask ``mask`` [L, H] (None: all ones)."""
    docs = _check_docs(docs, "mean_loss")
    total, count = 0.0, 0.0
    was_training = model.training
    model.eval()
    with HeadMask(model, mask):
        for ids, attn, w_BT in _batches(docs, max_tokens, batch_size, pad_id, _device(model)):
            total += float((_token_losses(model, ids, attn) * w_BT).sum(dtype=torch.float64))
            count += float(w_BT.sum())
    model.train(was_training)
    return total / count


def top_heads(scores_LH: torch.Tensor, quantile: float = 0.96) -> list[tuple[int, int]]:
    """(layer, head) pairs whose score is strictly above the ``quantile`` of the matrix, highest first."""
    if not 0.0 <= quantile < 1.0:
        raise ValueError(f"quantile must be in [0, 1), got {quantile}")
    flat = scores_LH.double().flatten()
    threshold = torch.quantile(flat, quantile)
    order = torch.argsort(flat, descending=True)
    H = scores_LH.shape[1]
    return [(int(k) // H, int(k) % H) for k in order if flat[k] > threshold]


def head_sets(scores: dict[str, torch.Tensor], quantile: float = 0.96,
              min_languages: int | None = None) -> dict[str, object]:
    """Language-specific and language-general heads from per-language score matrices.

    top[l]: heads above language l's ``quantile``; general: heads in the top set of >= ``min_languages`` languages
    (default min(4, number of languages)); specific[l] = top[l] minus general.
    """
    k = min(4, len(scores)) if min_languages is None else min_languages
    if k < 1:
        raise ValueError(f"min_languages must be >= 1, got {k}")
    top = {lang: top_heads(s, quantile) for lang, s in scores.items()}
    counts: dict[tuple[int, int], int] = {}
    for heads in top.values():
        for head in heads:
            counts[head] = counts.get(head, 0) + 1
    general = sorted(h for h, c in counts.items() if c >= k)
    specific = {lang: [h for h in heads if h not in set(general)] for lang, heads in top.items()}
    return {"quantile": quantile, "min_languages": k, "top": top, "general": general, "specific": specific}


def mask_without(heads: Sequence[tuple[int, int]], num_layers: int, num_heads: int) -> torch.Tensor:
    """fp32 [L, H]: ones with the given (layer, head) entries set to 0."""
    mask = torch.ones(num_layers, num_heads)
    for layer, head in heads:
        mask[layer, head] = 0.0
    return mask


def ablation_matrix(model: torch.nn.Module, eval_docs: dict[str, Docs], heads: dict[str, Sequence[tuple[int, int]]],
                    max_tokens: int = 2048, batch_size: int = 8, pad_id: int = 0) -> dict[str, object]:
    """Cross-language ablation: ppl of language a's docs with language b's heads masked, over unmasked ppl.

    Returns ``languages`` (rows a = evaluated, columns b = masked), ``ratio`` [A][B] = ppl(a | b masked) / ppl(a),
    ``base_ppl`` per language, and ``diag_over_offdiag``: mean diagonal relative increase (ratio - 1) over the
    mean off-diagonal one (> 1 is the paper's "dark diagonal"; languages with no heads to mask are left out).
    """
    L, H, _ = head_shape(model)
    rows = list(eval_docs)
    cols = [b for b in heads if b in eval_docs]
    kw = {"max_tokens": max_tokens, "batch_size": batch_size, "pad_id": pad_id}
    base = {a: mean_loss(model, eval_docs[a], None, **kw) for a in rows}
    ratio = [[math.exp(mean_loss(model, eval_docs[a], mask_without(heads[b], L, H), **kw) - base[a])
              if heads[b] else 1.0 for b in cols] for a in rows]
    used = [j for j, b in enumerate(cols) if heads[b]]
    diag = [ratio[rows.index(cols[j])][j] - 1 for j in used]
    off = [ratio[i][j] - 1 for i in range(len(rows)) for j in used if rows[i] != cols[j]]
    d, o = (sum(diag) / len(diag) if diag else float("nan")), (sum(off) / len(off) if off else float("nan"))
    return {"languages": rows, "masked": cols, "ratio": ratio, "base_ppl": {a: math.exp(base[a]) for a in rows},
            "mean_diag_increase": d, "mean_offdiag_increase": o,
            "diag_over_offdiag": d / o if o and not math.isnan(o) else float("nan")}


def single_head_ablation(model: torch.nn.Module, docs: Docs, max_tokens: int = 2048, batch_size: int = 8,
                         pad_id: int = 0) -> torch.Tensor:
    """fp64 [L, H]: mean loss increase when each head alone is masked (the ranking LAHIS should agree with)."""
    L, H, _ = head_shape(model)
    kw = {"max_tokens": max_tokens, "batch_size": batch_size, "pad_id": pad_id}
    base = mean_loss(model, docs, None, **kw)
    out = torch.zeros(L, H, dtype=torch.float64)
    for i in range(L):
        for h in range(H):
            out[i, h] = mean_loss(model, docs, mask_without([(i, h)], L, H), **kw) - base
    return out
