"""Vocab-parallel token embedding, LM head and label-smoothed cross-entropy over a TP group.

Legend: B batch, L target length, N = B*L tokens, D width, V real vocabulary, Vp padded vocabulary
(`layout.padded_vocab_size(V, t)`), t TP size, Vl = Vp / t rows owned by this rank.

TP rank k owns rows [k*Vl, (k+1)*Vl) of the embedding table (megatron `VocabParallelEmbedding`: masked lookup,
one forward all-reduce). A tied LM head multiplies by that same local shard, giving this rank's logit columns;
the loss never materialises the full [N, Vp] logits.

Padding rows [V, Vp) are zero, never looked up (ids < V), and masked out of the loss (their logits are set to
-inf before the softmax and left out of the smoothing mean), so the loss equals the single-device one over V.

NOTE: the cross-entropy is ours, not megatron's `vocab_parallel_cross_entropy`: megatron's label smoothing uses
eps' = eps*Vp/(Vp-1) and a mean over the *padded* vocabulary, which is not torch's / fairseq's
(1-eps)*nll + eps*mean_V(-log p) that the single-device trainer uses. Ours needs two all-reduces per forward
(the row max, then one packed [N, 3] sum) and none in backward (the sums' backward is the identity because
every TP rank computes the same loss).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import Tensor, nn

from hs_scale.parallel.tp_attention import linear_config


@functools.cache
def _embedding_class():
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    class VocabParallelTokenEmbedding(VocabParallelEmbedding):
        """Token embedding [Vp, D] split by rows over the TP group; forward(ids_BL) -> [B, L, D] (replicated).

        Subclass (not a wrapper) so the state-dict key stays `...embed_tokens.weight`, as on one device.
        Keeps nn.Embedding's padding_idx semantics: no gradient reaches the pad row through the lookup (the pad
        row still gets the tied LM head's gradient, exactly as in the single-device model).
        `weight` is the local shard [Vl, D] with megatron's TP attributes (tensor_model_parallel, partition_dim=0).
        """

        def __init__(self, vocab_size: int, padded_vocab: int, dim: int, pad_id: int, tp_group):
            super().__init__(
                padded_vocab,
                dim,
                init_method=nn.init.zeros_,
                config=linear_config(dist.get_world_size(tp_group)),
                tp_group=tp_group,
            )
            self.vocab_size, self.padded_vocab, self.pad_id = vocab_size, padded_vocab, pad_id
            self.vocab_start = self.vocab_start_index

        @torch.no_grad()
        def load_dense_(self, weight_VD: Tensor) -> None:
            """Copy this rank's rows of a dense [V, D] table (rows past V stay zero)."""
            self.weight.zero_()
            start, stop = self.vocab_start, min(self.vocab_start + self.weight.shape[0], self.vocab_size)
            if stop > start:
                self.weight[: stop - start].copy_(weight_VD[start:stop])

        def forward(self, ids_BL: Tensor) -> Tensor:  # type: ignore[override]
            x_BLD = super().forward(ids_BL)
            # padding_idx semantics: pad positions send no gradient to the table (values are unchanged).
            keep = ids_BL.ne(self.pad_id).unsqueeze(-1)
            return torch.where(keep, x_BLD, x_BLD.detach())

    return VocabParallelTokenEmbedding


def vocab_parallel_embedding(vocab_size: int, padded_vocab: int, dim: int, pad_id: int, tp_group) -> nn.Module:
    """A `VocabParallelTokenEmbedding` (megatron VocabParallelEmbedding subclass), zero-initialised."""
    return _embedding_class()(vocab_size, padded_vocab, dim, pad_id, tp_group)


class VocabParallelLMHead(nn.Module):
    """Untied LM head: a [Vp, D] weight split by rows (like the embedding); forward(h) -> local logits [.., Vl]."""

    def __init__(self, vocab_size: int, padded_vocab: int, dim: int, tp_group):
        super().__init__()
        from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

        t, k = dist.get_world_size(tp_group), dist.get_rank(tp_group)
        rows = padded_vocab // t
        self.vocab_size, self.padded_vocab, self.vocab_start = vocab_size, padded_vocab, k * rows
        self.weight = nn.Parameter(torch.zeros(rows, dim))
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1)

    @torch.no_grad()
    def load_dense_(self, weight_VD: Tensor) -> None:
        self.weight.zero_()
        stop = min(self.vocab_start + self.weight.shape[0], self.vocab_size)
        if stop > self.vocab_start:
            self.weight[: stop - self.vocab_start].copy_(weight_VD[self.vocab_start : stop])


def local_logits(h_BLD: Tensor, weight_VlD: Tensor, tp_group) -> Tensor:
    """This rank's logit columns [B, L, Vl]; the input enters the TP region (backward all-reduce of dL/dh)."""
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    h_BLD = copy_to_tensor_model_parallel_region(h_BLD, group=tp_group)
    return nn.functional.linear(h_BLD, weight_VlD)


def vocab_parallel_label_smoothed_ce(
    logits_NVl: Tensor,
    target_N: Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    pad_id: int,
    label_smoothing: float,
    tp_group,
) -> tuple[Tensor, Tensor, Tensor]:
    """(smoothed loss sum, per-token nll [N] (detached, 0 at padding), token count) over non-pad targets;
    identical on every TP rank.

    Per token: loss = (1-eps) * (lse - z_y) + eps * (lse - mean_{c<V} z_c), i.e. torch's
    F.cross_entropy(label_smoothing=eps) over the V real classes. logits_NVl: this rank's columns (any dtype;
    computed in fp32). target_N: global class ids (pad_id marks ignored tokens).
    """
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    z_NVl = logits_NVl.float()
    Vl = z_NVl.shape[-1]
    cols_Vl = torch.arange(vocab_start, vocab_start + Vl, device=z_NVl.device)
    real_Vl = cols_Vl < vocab_size
    z_NVl = z_NVl.masked_fill(~real_Vl, float("-inf"))
    # The row max only shifts the exponent (lse is invariant to it): no gradient needed through the max.
    max_N = z_NVl.detach().max(dim=-1).values
    if dist.get_world_size(tp_group) > 1:
        dist.all_reduce(max_N, op=dist.ReduceOp.MAX, group=tp_group)
    sumexp_N = torch.exp(z_NVl - max_N[:, None]).sum(-1)
    local_t = target_N - vocab_start
    mine_N = (local_t >= 0) & (local_t < Vl)
    z_y_N = z_NVl.gather(1, local_t.clamp(0, Vl - 1)[:, None]).squeeze(1)
    z_y_N = torch.where(mine_N, z_y_N, torch.zeros_like(z_y_N))  # where, not *: a clamped pad column is -inf
    sum_real_N = z_NVl.masked_fill(~real_Vl, 0.0).sum(-1)
    packed_N3 = reduce_from_tensor_model_parallel_region(torch.stack([sumexp_N, z_y_N, sum_real_N], -1), tp_group)
    lse_N = max_N + packed_N3[:, 0].log()
    nll_N = lse_N - packed_N3[:, 1]
    smooth_N = lse_N - packed_N3[:, 2] / vocab_size
    keep_N = target_N.ne(pad_id)
    loss_N = (1.0 - label_smoothing) * nll_N + label_smoothing * smooth_N
    zero = torch.zeros((), device=z_NVl.device)
    return (
        torch.where(keep_N, loss_N, zero).sum(),
        torch.where(keep_N, nll_N.detach(), zero),
        keep_N.sum(),
    )
