"""Batched greedy and beam search over ``model.encode`` + incremental ``model.decode(..., cache=DecoderCache)``.

Legend: B batch (source rows), k beams, L generated length, S source length, D model width, V vocabulary.

Conventions (fairseq's ``SequenceGenerator``, which produced the paper's numbers):
- decoding starts from ``batch.decoder_input[:, 0]`` (a target-language tag or </s>), one start token per row;
- a row may emit at most ``max_len_a * src_len + max_len_b`` tokens before </s> is forced (scored 0, as HF's
  ``forced_eos_token_id``), where src_len is the row's non-pad source tokens (text) or feature frames (speech),
  per row rather than per batch;
- </s> closes a hypothesis; <pad> is never generated;
- score = sum of log-probs (</s> included) / (tokens + 1) ** length_penalty, the +1 counting </s>;
- beam search keeps the k best closed hypotheses of a row and stops the row once no open beam beats the worst of
  them (see ``beam_search``); it returns the best-scoring one.
Rows keep their own ``tgt_task`` (mixed-task batches); beams of a row share its task, so the per-task head choice
made on the cache's first call stays valid across ``cache.reorder``. Finished rows are dropped from the batch
(compaction) so that long outputs do not make short ones pay.
Selection must be deterministic, so search runs the model in eval mode (restoring its mode afterwards).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class SearchConfig:
    beam: int = 5
    """Beams per row (paper: 5); 1 runs greedy search."""

    max_len_a: float = 0.0
    """Max output tokens = max_len_a * src_len + max_len_b (src_len: source tokens, or speech feature frames)."""

    max_len_b: int = 200
    """See max_len_a."""

    length_penalty: float = 1.0
    """Exponent of the length normalisation of hypothesis scores (0: raw sum of log-probs)."""

    def __post_init__(self) -> None:
        if self.beam < 1:
            raise ValueError(f"beam={self.beam} must be >= 1")
        if self.max_len_a < 0 or self.max_len_b < 0:
            raise ValueError(f"max_len_a={self.max_len_a} and max_len_b={self.max_len_b} must be >= 0")


@dataclass
class SearchOutput:
    tokens: list[list[int]]
    """Best hypothesis per row [B], without the start token and without </s>."""
    scores: list[float]
    """Its length-normalised score per row [B] (see the module docstring)."""


def sequence_score(logprob_sum: float, num_tokens: int, length_penalty: float) -> float:
    """Length-normalised score of a hypothesis of ``num_tokens`` tokens plus </s>."""
    return logprob_sum / (num_tokens + 1) ** length_penalty


def encode_batch(model: nn.Module, batch) -> tuple[Tensor, Tensor, Tensor]:
    """(memory_BSD, memory_padding_mask_BS, src_len_B) of a speech (features) or text (source_tokens) batch."""
    if getattr(batch, "features", None) is not None:
        memory, mask = model.encode(batch.features, batch.feature_lengths, batch.src_task)
        lengths = batch.feature_lengths
        if lengths is None:
            lengths = torch.full((batch.features.shape[0],), batch.features.shape[1], dtype=torch.long)
        return memory, mask, lengths.to(memory.device)
    source = batch.source_tokens
    memory, mask = model.encode(source, batch.src_task)
    return memory, mask, source.ne(model.config.pad_token_id).sum(1)


class _Rows:
    """What the decoder sees of the still-active rows (each already expanded to k beams): memory, mask, tasks.

    ``ids`` maps active rows to their index in the original batch. ``keep(rows)`` compacts everything.
    """

    def __init__(self, memory_BSD: Tensor, mask_BS: Tensor, task_B: Tensor | None, k: int):
        self.k = k
        self.memory = memory_BSD.repeat_interleave(k, dim=0)
        self.mask = mask_BS.repeat_interleave(k, dim=0)
        self.task = None if task_B is None else task_B.repeat_interleave(k, dim=0)
        self.ids = torch.arange(memory_BSD.shape[0], device=memory_BSD.device)

    def keep(self, rows_R: Tensor) -> None:
        expanded = (rows_R[:, None] * self.k + torch.arange(self.k, device=rows_R.device)).view(-1)
        self.memory, self.mask = self.memory[expanded], self.mask[expanded]
        self.task = None if self.task is None else self.task[expanded]
        self.ids = self.ids[rows_R]


def _next_logprobs(model, step_in_Bk: Tensor, rows: _Rows, cache, eos_only_Bk: Tensor, eos: int, pad: int):
    """logprobs_BkV of the next token; <pad> banned, rows past their max length may only emit </s>."""
    logits = model.decode(step_in_Bk[:, None], rows.memory, rows.mask, rows.task, cache=cache)[:, -1]
    logp = torch.log_softmax(logits.float(), dim=-1)
    logp[:, pad] = -torch.inf
    if bool(eos_only_Bk.any()):
        # Forced </s> scores 0, as HF's forced_eos_token_id does: an exported model's beam search then ranks
        # length-capped hypotheses exactly as this one (fairseq would keep the model's </s> log-prob).
        logp[eos_only_Bk] = -torch.inf
        logp[eos_only_Bk, eos] = 0.0
    return logp


@torch.no_grad()
def greedy_search(model: nn.Module, batch, cfg: SearchConfig | None = None) -> SearchOutput:
    """Argmax decoding of every row, with a per-row finished flag (rows are compacted away once finished)."""
    cfg = cfg or SearchConfig(beam=1)
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    memory, mask, src_len_B = encode_batch(model, batch)
    max_len_B = (cfg.max_len_a * src_len_B.float() + cfg.max_len_b).long()
    B = memory.shape[0]
    rows = _Rows(memory, mask, batch.tgt_task, 1)
    cache = model.new_cache()
    last_B = batch.decoder_input[:, 0].to(memory.device)
    out: list[list[int]] = [[] for _ in range(B)]
    sums = [0.0] * B
    score_B = torch.zeros(B, device=memory.device)
    step = 0
    while rows.ids.numel():
        logp = _next_logprobs(model, last_B, rows, cache, step >= max_len_B[rows.ids], eos, pad)
        best_logp, tok_B = logp.max(dim=-1)
        score_B = score_B + best_logp
        finished_B = tok_B.eq(eos)
        for r, (b, t) in enumerate(zip(rows.ids.tolist(), tok_B.tolist(), strict=True)):
            if t == eos:
                sums[b] = float(score_B[r])
            else:
                out[b].append(t)
        step += 1
        if bool(finished_B.any()):
            keep_R = (~finished_B).nonzero().view(-1)
            cache.reorder(keep_R)
            rows.keep(keep_R)
            tok_B, score_B = tok_B[keep_R], score_B[keep_R]
        last_B = tok_B
    return SearchOutput(out, [sequence_score(s, len(o), cfg.length_penalty) for s, o in zip(sums, out, strict=True)])


@torch.no_grad()
def beam_search(model: nn.Module, batch, cfg: SearchConfig) -> SearchOutput:
    """Beam search with k = cfg.beam beams per row over one KV cache of B*k rows (reordered each step)."""
    k, lp = cfg.beam, cfg.length_penalty
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    memory, mask, src_len_B = encode_batch(model, batch)
    dev = memory.device
    max_len_B = (cfg.max_len_a * src_len_B.float() + cfg.max_len_b).long()
    B = memory.shape[0]
    rows = _Rows(memory, mask, batch.tgt_task, k)
    cache = model.new_cache()
    tokens_BkL = batch.decoder_input[:, :1].to(dev).repeat_interleave(k, dim=0)
    # Only beam 0 of each row is alive at the start: k identical beams would fill the beam with duplicates.
    cum_Bk = torch.full((B, k), -torch.inf, device=dev)
    cum_Bk[:, 0] = 0.0
    cum_Bk = cum_Bk.view(-1)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    step = 0
    while rows.ids.numel():
        R = rows.ids.numel()
        at_max_Bk = (step >= max_len_B[rows.ids]).repeat_interleave(k)
        logp_BkV = _next_logprobs(model, tokens_BkL[:, -1], rows, cache, at_max_Bk, eos, pad)
        V = logp_BkV.shape[-1]
        cand_RkV = (cum_Bk[:, None] + logp_BkV).view(R, k * V)
        # 2k candidates: even if k of them are </s>, k continuations remain to fill the beam.
        cand_score_R2k, cand_idx_R2k = cand_RkV.topk(2 * k, dim=-1)
        beam_R2k, tok_R2k = cand_idx_R2k // V, cand_idx_R2k % V
        is_eos_R2k = tok_R2k.eq(eos)
        # As in fairseq, only </s> among the top k candidates closes a hypothesis.
        closes = is_eos_R2k & cand_score_R2k.isfinite()
        closes[:, k:] = False
        for r, c in closes.nonzero().tolist():
            b = int(rows.ids[r])
            prefix = tokens_BkL[r * k + int(beam_R2k[r, c]), 1:].tolist()
            finished[b].append((sequence_score(float(cand_score_R2k[r, c]), len(prefix), lp), prefix))
            # Keep the k best closed hypotheses (stable sort: on ties the earlier, shorter one wins).
            finished[b] = sorted(finished[b], key=lambda h: -h[0])[:k]
        # Next beams: the k best candidates that are not </s> (stable sort keeps the score order).
        rank_R2k = torch.arange(2 * k, device=dev) + is_eos_R2k.long() * 2 * k
        pick_Rk = rank_R2k.argsort(dim=-1, stable=True)[:, :k]
        next_beam_Rk = beam_R2k.gather(1, pick_Rk)
        next_tok_Rk = tok_R2k.gather(1, pick_Rk)
        next_cum_Rk = cand_score_R2k.gather(1, pick_Rk)
        step += 1
        # A row stops once it holds k closed hypotheses and its best open beam, scored as if it closed now, is no
        # better than the worst of them (HF's default criterion). fairseq stops at the first k closed ones, which
        # with a length penalty can return a worse hypothesis than greedy search.
        open_best_R = (next_cum_Rk.max(dim=1).values / float(step) ** lp).tolist()
        done_R = torch.tensor(
            [len(finished[b]) >= k and open_best_R[r] <= finished[b][-1][0] for r, b in enumerate(rows.ids.tolist())],
            dtype=torch.bool,
            device=dev,
        )
        done_R |= step > max_len_B[rows.ids]  # </s> was forced this step
        done_R |= ~next_cum_Rk.isfinite().any(dim=1)  # nothing alive left to extend
        keep_R = (~done_R).nonzero().view(-1)
        # One reorder does both jobs: pick each kept row's surviving beams, and drop finished rows.
        src_Rk = (keep_R[:, None] * k + next_beam_Rk[keep_R]).view(-1)
        cache.reorder(src_Rk)
        tokens_BkL = torch.cat([tokens_BkL[src_Rk], next_tok_Rk[keep_R].view(-1, 1)], dim=1)
        cum_Bk = next_cum_Rk[keep_R].view(-1)
        # Beams stay inside their row, so memory/mask/task rows only change by compaction, never by beam order.
        if keep_R.numel() < R:
            rows.keep(keep_R)
    best = [max(hyps, key=lambda h: h[0]) if hyps else (-float("inf"), []) for hyps in finished]
    return SearchOutput([h[1] for h in best], [h[0] for h in best])


def generate(model: nn.Module, batch, cfg: SearchConfig | None = None) -> SearchOutput:
    """Greedy (beam 1) or beam search of ``batch`` in eval mode (deterministic head selection)."""
    cfg = cfg or SearchConfig()
    was_training = model.training
    model.eval()
    try:
        return greedy_search(model, batch, cfg) if cfg.beam == 1 else beam_search(model, batch, cfg)
    finally:
        model.train(was_training)
