"""Grouped-query attention with per-task query-head selection (decoder-only LMs).

Legend: B batch, T query length (new tokens), S key length (cached + new), D model width, H query-head slots,
G KV heads, n = H / G query heads per KV head, r candidates per slot, P = H * r pool (candidate) heads,
d head dim, N = B * T tokens.

Design (docs/method.md, "Head selection in decoder-only LMs with grouped-query attention"): each of the H
query-head slots chooses among r candidate query heads that all read the slot's KV head. K/V projections and the
KV cache are exactly the dense GQA model's; a candidate owns its Q rows (q_proj) and its o_proj input columns.
A task's sub-network is therefore an ordinary H-head GQA model.

Pool layout: candidate p = h * r + j is candidate j of slot h, and slot h reads KV head h // n (transformers'
repeat_kv order), so candidate p reads KV head p // (n * r). With r = 1 the parameters are exactly those of
transformers' LlamaAttention. The selector (hs_scale.selection.selector.HeadSelector, pool P, active H,
partitions = G) then keeps every choice on the right KV head:
  * group:  slot h takes one of its r candidates [h*r, (h+1)*r);
  * subset: partition g (the n*r candidates of KV head g) gives its n best candidates, slotted in ascending order
            into slots g*n .. (g+1)*n - 1, which read KV head g.

Per-token tasks: a packed row may hold documents of several languages, each with its own heads. Tokens are grouped
by task (``TaskSegments`` over the N flattened tokens); each group is projected with its task's gathered Q rows and,
after attention, with its task's gathered o_proj columns, into which the straight-through slot weight w is folded
(the output projection is linear in each head's output, so w * o_h == (w * W_o[:, h]) o_h: H*d*D multiplies instead
of N*H*d). Attention itself is ONE H-head GQA kernel call over the whole batch, causal and within-document:
SDPA with a block-diagonal causal mask (CPU, or any cached decoding step), or a varlen kernel over packed documents
(flash-attn / torch.nn.attention.varlen on CUDA) with cu_seqlens from document boundaries; rows holding one
document each run unmasked (SDPA is_causal). No kernel sees the pool.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hs_scale.selection.attention import LOCAL, Projections, TaskSegments
from hs_scale.selection.backends import HAVE_FLASH_ATTN, HAVE_TORCH_VARLEN
from hs_scale.selection.selector import HeadChoice

if HAVE_FLASH_ATTN:
    from flash_attn import flash_attn_varlen_func
if HAVE_TORCH_VARLEN:
    from torch.nn.attention.varlen import varlen_attn

    _VARLEN_PARAMS = inspect.signature(varlen_attn).parameters

VARLEN_BACKENDS = ("flash", "torch_varlen")


# --- documents: which keys each query may see ---------------------------------------------------------------------


def document_runs(doc_BS: Tensor) -> tuple[Tensor, Tensor]:
    """A document is a maximal run of equal doc ids in a row. Returns (run id [B, S], run start flags [B, S]).

    Runs, not raw ids, decide attention: a doc id that reappears later in a row starts a new document.
    """
    starts_BS = torch.ones_like(doc_BS, dtype=torch.bool)
    starts_BS[:, 1:] = doc_BS[:, 1:] != doc_BS[:, :-1]
    return starts_BS.cumsum(dim=1), starts_BS


def positions_in_documents(doc_BS: Tensor) -> Tensor:
    """Position of every token inside its document (0 at each document start): long [B, S]."""
    _, starts_BS = document_runs(doc_BS)
    index_BS = torch.arange(doc_BS.shape[1], device=doc_BS.device).expand_as(doc_BS)
    start_index_BS = torch.where(starts_BS, index_BS, torch.zeros_like(index_BS)).cummax(dim=1).values
    return index_BS - start_index_BS


@dataclass
class DocumentLayout:
    """How one forward's queries see keys; built once per model forward, shared by every layer.

    ``backend``: the kernel that runs ("sdpa", "eager", "flash" or "torch_varlen").
    mask mode (``allowed_B1TS``): bool [B, 1, T, S], True where query t may attend to key s: same document and
    not in the future (the T queries are the last T of the S keys).
    varlen mode (``cu_seqlens``): int32 [num_docs + 1] offsets of the documents in the N flattened tokens, and
    ``max_len`` the longest document; only without a cache (queries == keys).
    neither: every row is one document, so plain causal attention (``causal``, when T == S) or none (T == 1)
    is exact; SDPA then picks its fused kernels, which an explicit mask would rule out on GPU.
    """

    backend: str
    allowed_B1TS: Tensor | None = None
    cu_seqlens: Tensor | None = None
    max_len: int = 0
    causal: bool = False

    @classmethod
    def build(cls, doc_BS: Tensor, num_queries: int, backend: str) -> DocumentLayout:
        """doc_BS: doc ids of all S keys (cached + new); the last ``num_queries`` are this call's queries.

        backend: the resolved kernel (``resolve_backend``); the varlen kernels serve uncached forwards only, a
        cached step (T < S) runs SDPA with the mask.
        """
        B, S = doc_BS.shape
        T = num_queries
        run_BS, starts_BS = document_runs(doc_BS)
        dense_backend = "eager" if backend == "eager" else "sdpa"
        if (T == S or T == 1) and not bool(starts_BS[:, 1:].any()):  # one document per row (one host sync)
            return cls(dense_backend, causal=T > 1)
        if backend in VARLEN_BACKENDS and T == S:
            starts_N = starts_BS.reshape(-1)
            bounds = torch.cat([starts_N.nonzero().squeeze(1), torch.tensor([B * S], device=doc_BS.device)])
            return cls(backend, cu_seqlens=bounds.to(torch.int32), max_len=int(bounds.diff().max()))
        same_doc_BTS = run_BS[:, S - T :, None] == run_BS[:, None, :]
        device = doc_BS.device
        causal_TS = torch.arange(S, device=device)[None, :] <= torch.arange(S - T, S, device=device)[:, None]
        return cls(dense_backend, allowed_B1TS=(same_doc_BTS & causal_TS)[:, None])


# --- kernels ------------------------------------------------------------------------------------------------------


def gqa_attention(q_BHTd: Tensor, k_BGSd: Tensor, v_BGSd: Tensor, layout: DocumentLayout) -> Tensor:
    """One H-head GQA attention call over G KV heads: out [B, H, T, d]."""
    if layout.cu_seqlens is not None:
        return _varlen(q_BHTd, k_BGSd, v_BGSd, layout)
    mask = layout.allowed_B1TS
    if layout.backend == "eager":  # written out: the reference the fused kernels are tested against
        n = q_BHTd.shape[1] // k_BGSd.shape[1]
        k, v = k_BGSd.repeat_interleave(n, dim=1), v_BGSd.repeat_interleave(n, dim=1)
        scores = q_BHTd @ k.transpose(-1, -2) / math.sqrt(q_BHTd.shape[-1])
        if layout.causal:
            T = scores.shape[-1]
            mask = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q_BHTd, k_BGSd, v_BGSd, attn_mask=mask, is_causal=layout.causal,
                                          enable_gqa=True)


def _varlen(q_BHTd: Tensor, k_BGSd: Tensor, v_BGSd: Tensor, layout: DocumentLayout) -> Tensor:
    """Causal attention over the packed documents of the batch (queries == keys, no padding to drop)."""
    B, H, T, d = q_BHTd.shape
    q, k, v = (t.transpose(1, 2).reshape(B * T, t.shape[1], d) for t in (q_BHTd, k_BGSd, v_BGSd))
    cu, max_len = layout.cu_seqlens, layout.max_len
    if layout.backend == "flash":  # flash-attn takes fewer KV heads than query heads natively
        out = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                                     max_seqlen_k=max_len, causal=True)
    else:
        kwargs = {"window_size": (-1, 0)} if "window_size" in _VARLEN_PARAMS else {"is_causal": True}
        if "enable_gqa" in _VARLEN_PARAMS:
            kwargs["enable_gqa"] = True
        else:  # older torch: expand the KV heads to the query heads
            n = H // k.shape[1]
            k, v = k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1)
        out = varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)
    return out.view(B, T, H, d).transpose(1, 2)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x_BHTd: Tensor, cos_BTd: Tensor, sin_BTd: Tensor) -> Tensor:
    """Llama's rotary embedding (rotate-half convention, as transformers' apply_rotary_pos_emb)."""
    return x_BHTd * cos_BTd[:, None] + rotate_half(x_BHTd) * sin_BTd[:, None]


# --- the layer ----------------------------------------------------------------------------------------------------


class GQASelectedAttention(nn.Module):
    """GQA self-attention whose H query-head slots each use one of r candidates (module docstring).

    Parameters (names and, at r = 1, shapes of transformers' LlamaAttention):
      q_proj  D -> P*d   (rows of candidate p at [p*d, (p+1)*d))
      k_proj  D -> G*d,  v_proj  D -> G*d
      o_proj  P*d -> D   (input columns of candidate p at [p*d, (p+1)*d))

    ``projections`` builds them (default: nn.Linear on one device). A tensor-parallel spec with t partitions
    (hs_scale.parallel.tp_attention.MegatronProjections) gives column-parallel q/k/v and a row-parallel o_proj:
    this module then holds KV heads [k*G/t, (k+1)*G/t), their H/t slots and P/t candidates (contiguous in the
    pool layout), ``num_heads`` / ``num_kv_heads`` / ``pool_heads`` are those local counts, and ``choice`` is a
    local HeadChoice (a TP rank's selector slice). The forward is the same code: the input enters the TP region
    once, q/k/v are projected with the weights (never the column modules' forward), and the o_proj partial sums
    are all-reduced once (``projections.reduce``), as for a dense GQA layer under megatron's TP.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        candidates: int = 1,
        qkv_bias: bool = False,
        o_bias: bool = False,
        *,
        projections: Projections = LOCAL,
    ):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
        t = projections.partitions
        if num_kv_heads % t:
            raise ValueError(f"tensor_parallel={t} must divide num_kv_heads={num_kv_heads} (ranks own whole KV heads)")
        pool_heads = num_heads * candidates
        self.projections = projections
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads // t, num_kv_heads // t
        self.head_dim, self.candidates = head_dim, candidates
        self.pool_heads = pool_heads // t
        self.q_proj = projections.column(hidden_size, pool_heads * head_dim, qkv_bias)
        self.k_proj = projections.column(hidden_size, num_kv_heads * head_dim, qkv_bias)
        self.v_proj = projections.column(hidden_size, num_kv_heads * head_dim, qkv_bias)
        self.o_proj = projections.row(pool_heads * head_dim, hidden_size, o_bias)
        # NOTE: a pooled layer never calls o_proj as a module (it projects with gathered columns), so a forward
        # pre-hook on o_proj would miss it; this identity is the hook point for head masks (LAHIS) in every layer.
        self.slot_outputs = nn.Identity()
        """Called on [B, T, H*d]: the H slots' attention outputs (slot h at [h*d, (h+1)*d)) before o_proj."""

    def extra_repr(self) -> str:
        shard = f", partitions={self.projections.partitions}" if self.projections.partitions > 1 else ""
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, candidates={self.candidates}, "
                f"head_dim={self.head_dim}{shard}")

    def kv_head_of(self, pool_head: Tensor | int):
        """The KV head a pool candidate reads (module docstring, "Pool layout")."""
        return pool_head // (self.num_heads // self.num_kv_heads * self.candidates)

    # Per-task weights. index_select is differentiable: gradients scatter back into the pool rows/columns.
    def _q_weights(self, choice: HeadChoice, task: int) -> tuple[Tensor, Tensor | None]:
        """Q rows [H*d, D] (and bias [H*d]) of the task's selected candidates, in slot order."""
        P, d = self.pool_heads, self.head_dim
        heads_H = choice.heads[task]
        W = self.q_proj.weight.view(P, d, -1).index_select(0, heads_H).reshape(self.num_heads * d, -1)
        b = self.q_proj.bias
        return W, None if b is None else b.view(P, d).index_select(0, heads_H).reshape(-1)

    def _o_weights(self, choice: HeadChoice, task: int) -> Tensor:
        """o_proj columns [D, H*d] of the task's candidates, each scaled by its straight-through weight w."""
        P, d = self.pool_heads, self.head_dim
        W_DHd = self.o_proj.weight.view(-1, P, d).index_select(1, choice.heads[task])
        w_H = choice.weights[task].to(W_DHd.dtype)
        return (W_DHd * w_H[None, :, None]).reshape(-1, self.num_heads * d)

    def _per_task(self, fn, x_ND: Tensor, tokens: TaskSegments | None) -> Tensor:
        return fn(0, x_ND) if tokens is None else tokens.map(fn, x_ND)

    def forward(
        self,
        x_BTD: Tensor,
        cos_BTd: Tensor,
        sin_BTd: Tensor,
        layout: DocumentLayout,
        choice: HeadChoice | None = None,
        tokens: TaskSegments | None = None,
        cache: dict | None = None,
    ) -> Tensor:
        """Attention output [B, T, D].

        choice: this layer's HeadChoice for every task (None: dense, requires candidates == 1).
        tokens: the N = B*T tokens grouped by task (None: every token is task 0).
        layout: which keys each query sees (DocumentLayout over the cached + new keys).
        cache: a dict owned by the caller for incremental decoding: k/v [B, G, S, d] of all earlier tokens;
            this call's k/v are appended (exactly the dense GQA model's cache, whatever the selection).
        """
        B, T, D = x_BTD.shape
        H, G, d = self.num_heads, self.num_kv_heads, self.head_dim
        x_BTD = self.projections.enter(x_BTD)  # TP: one all-reduce of dL/dx in backward for q, k and v together
        if choice is None:
            if self.candidates != 1:
                raise ValueError("a layer with r > 1 candidates per slot needs a HeadChoice; pass choice=")
            q_BTn = F.linear(x_BTD, self.q_proj.weight, self.q_proj.bias)
        else:
            q_BTn = self._per_task(lambda t, rows: F.linear(rows, *self._q_weights(choice, t)),
                                   x_BTD.reshape(B * T, D), tokens).view(B, T, H * d)
        q_BHTd = apply_rope(q_BTn.view(B, T, H, d).transpose(1, 2), cos_BTd, sin_BTd)
        k_BTn = F.linear(x_BTD, self.k_proj.weight, self.k_proj.bias)
        k_BGTd = apply_rope(k_BTn.view(B, T, G, d).transpose(1, 2), cos_BTd, sin_BTd)
        v_BGTd = F.linear(x_BTD, self.v_proj.weight, self.v_proj.bias).view(B, T, G, d).transpose(1, 2)
        if cache is not None:
            if "k" in cache:
                k_BGTd = torch.cat([cache["k"], k_BGTd], dim=2)
                v_BGTd = torch.cat([cache["v"], v_BGTd], dim=2)
            cache["k"], cache["v"] = k_BGTd, v_BGTd

        out_BHTd = gqa_attention(q_BHTd, k_BGTd, v_BGTd, layout)
        out_ND = self.slot_outputs(out_BHTd.transpose(1, 2).reshape(B, T, H * d)).reshape(B * T, H * d)
        if choice is None:
            return self.o_proj(out_ND).view(B, T, D)  # a module call: LAHIS's o_proj pre-hook sees dense layers
        y_ND = self._per_task(lambda t, rows: F.linear(rows, self._o_weights(choice, t)), out_ND, tokens)
        y_ND = self.projections.reduce(y_ND)  # TP: the row-parallel sum over ranks, before the (replicated) bias
        if self.o_proj.bias is not None:
            y_ND = y_ND + self.o_proj.bias
        return y_ND.view(B, T, D)
