"""Greedy and beam search: agreement with each other, with a full-decoding reference, scores, determinism.

Legend: B batch, k beams, L length, V vocabulary, T frames, F features.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from hs_scale.evaluation.search import SearchConfig, beam_search, generate, greedy_search, sequence_score
from hs_scale.models import ModelConfig, build_model
from hs_scale.selection.config import SelectionConfig

V, NUM_TASKS = 24, 3


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster, and far faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = dict(
    d_model=16,
    encoder_layers=2,
    decoder_layers=2,
    num_heads=2,
    ffn_dim=32,
    vocab_size=V,
    conv_channels=8,
    input_feat_per_channel=6,
    conv_kernel_sizes=[3, 3],
    init_std=0.1,
)


def make_model(arch="text", seed=0, strategy="group", eos_bias=0.5):
    """Random tiny model; ``eos_bias`` is added to the </s> logit so that rows end at different steps (a random
    model rarely emits </s>, and finishing rows is what exercises compaction and the stopping rule)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, dropout=0.0, **TINY)
    model = build_model(cfg, SelectionConfig(pool_heads=4, strategy=strategy), NUM_TASKS).eval()
    project = model.output_projection

    def biased(h_BLD):
        logits_BLV = project(h_BLD)
        logits_BLV[..., cfg.eos_token_id] += eos_bias
        return logits_BLV

    model.output_projection = biased
    return model


@dataclass
class TextBatch:
    source_tokens: torch.Tensor  # long [B, S]
    decoder_input: torch.Tensor  # long [B, 1]: start token
    src_task: torch.Tensor  # long [B]
    tgt_task: torch.Tensor  # long [B]


@dataclass
class SpeechBatch:
    features: torch.Tensor  # float [B, T, F]
    feature_lengths: torch.Tensor  # long [B]
    decoder_input: torch.Tensor
    src_task: torch.Tensor
    tgt_task: torch.Tensor


def make_batch(arch="text", B=6, seed=1):
    """Mixed-task batch: rows of every task, different lengths, a per-row start tag (4 + task)."""
    g = torch.Generator().manual_seed(seed)
    tasks = torch.arange(B) % NUM_TASKS
    start = torch.full((B, 1), 2, dtype=torch.long)
    start[:, 0] = 4 + tasks
    if arch == "s2t":
        feats = torch.randn(B, 17, 6, generator=g)
        return SpeechBatch(feats, torch.tensor([17, 9, 13, 17, 5, 11][:B]), start, tasks, tasks.flip(0))
    lengths = torch.randint(3, 8, (B,), generator=g)
    src = torch.full((B, int(lengths.max())), 1, dtype=torch.long)
    for b, n in enumerate(lengths.tolist()):
        src[b, :n] = torch.randint(7, V, (n,), generator=g)
    return TextBatch(src, start, tasks, tasks.flip(0))


def encode(model, batch):
    if isinstance(batch, SpeechBatch):
        return model.encode(batch.features, batch.feature_lengths, batch.src_task)
    return model.encode(batch.source_tokens, batch.src_task)


@torch.no_grad()
def reference_greedy(model, batch, max_len):
    """Slow reference: one row at a time, re-running full (uncached) decoding of the whole prefix every step."""
    cfg = model.config
    memory, mask = encode(model, batch)
    outs, sums = [], []
    for b in range(memory.shape[0]):
        prefix, total = [int(batch.decoder_input[b, 0])], 0.0
        while True:
            logits = model.decode(torch.tensor([prefix]), memory[b : b + 1], mask[b : b + 1], batch.tgt_task[b : b + 1])
            logp = torch.log_softmax(logits[0, -1].float(), -1)
            logp[cfg.pad_token_id] = -torch.inf
            if len(prefix) - 1 >= max_len[b]:
                tok = cfg.eos_token_id  # forced: scores 0 (HF's forced_eos_token_id)
            else:
                tok = int(logp.argmax())
                total += float(logp[tok])
            if tok == cfg.eos_token_id:
                break
            prefix.append(tok)
        outs.append(prefix[1:])
        sums.append(total)
    return outs, sums


@torch.no_grad()
def rescore(model, batch, hyps, length_penalty, max_len=None):
    """Length-normalised teacher-forced score of given hypotheses (independent of the search code); a hypothesis of
    max_len tokens had its </s> forced, which scores 0."""
    memory, mask = encode(model, batch)
    scores = []
    for b, hyp in enumerate(hyps):
        dec = torch.tensor([[int(batch.decoder_input[b, 0])] + hyp])
        logp = torch.log_softmax(model.decode(dec, memory[b : b + 1], mask[b : b + 1], batch.tgt_task[b : b + 1]), -1)
        logp[..., model.config.pad_token_id] = -torch.inf
        tgt = hyp + [model.config.eos_token_id]
        total = float(sum(logp[0, i, t] for i, t in enumerate(tgt) if not (i == max_len and t == tgt[-1])))
        scores.append(sequence_score(total, len(hyp), length_penalty))
    return scores


@pytest.mark.parametrize("arch", ["text", "s2t"])
def test_cached_greedy_matches_full_decoding_reference(arch):
    model, batch = make_model(arch), make_batch(arch)
    cfg = SearchConfig(beam=1, max_len_a=0.0, max_len_b=12, length_penalty=0.0)
    out = greedy_search(model, batch, cfg)
    ref_tokens, ref_sums = reference_greedy(model, batch, [12] * 6)
    assert out.tokens == ref_tokens
    assert out.scores == pytest.approx(ref_sums, abs=1e-4)
    lengths = [len(t) for t in out.tokens]
    assert min(lengths) < 12 and max(lengths) == 12  # some rows stop at </s>, some at the length limit


@pytest.mark.parametrize("arch", ["text", "s2t"])
def test_greedy_equals_beam_one(arch):
    model, batch = make_model(arch, seed=3), make_batch(arch, seed=4)
    cfg = SearchConfig(beam=1, max_len_a=0.5, max_len_b=6, length_penalty=0.0)
    greedy, beam1 = greedy_search(model, batch, cfg), beam_search(model, batch, cfg)
    assert greedy.tokens == beam1.tokens
    assert greedy.scores == pytest.approx(beam1.scores, abs=1e-5)
    assert generate(model, batch, cfg) == greedy


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_one_with_length_penalty_extends_greedy(seed):
    """With a length penalty, beam 1 may look past greedy's </s> (an open beam can still score better after
    normalisation), so it is greedy's path and never scores below greedy."""
    model, batch = make_model("text", seed=seed), make_batch("text", seed=seed + 20)
    cfg = SearchConfig(beam=1, max_len_b=10, length_penalty=1.0)
    greedy, beam1 = greedy_search(model, batch, cfg), beam_search(model, batch, cfg)
    for g, b, g_score, b_score in zip(greedy.tokens, beam1.tokens, greedy.scores, beam1.scores, strict=True):
        assert b_score >= g_score - 1e-6
        assert b[: len(g)] == g


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lp", [0.0, 1.0])
def test_beam_scores_at_least_greedy_and_match_rescoring(seed, lp):
    model, batch = make_model("text", seed=seed), make_batch("text", seed=seed + 10)
    greedy = greedy_search(model, batch, SearchConfig(beam=1, max_len_b=10, length_penalty=lp))
    beam = beam_search(model, batch, SearchConfig(beam=5, max_len_b=10, length_penalty=lp))
    assert beam.scores == pytest.approx(rescore(model, batch, beam.tokens, lp, max_len=10), abs=1e-4)
    assert greedy.scores == pytest.approx(rescore(model, batch, greedy.tokens, lp, max_len=10), abs=1e-4)
    for b_score, g_score in zip(beam.scores, greedy.scores, strict=True):
        assert b_score >= g_score - 1e-5


def test_max_length_per_row_and_no_special_tokens():
    model, batch = make_model("text", seed=5), make_batch("text", seed=6)
    src_len = batch.source_tokens.ne(1).sum(1)
    for beam in (1, 4):
        out = generate(model, batch, SearchConfig(beam=beam, max_len_a=0.5, max_len_b=1))
        for b, toks in enumerate(out.tokens):
            assert len(toks) <= int(0.5 * int(src_len[b]) + 1)
            assert 1 not in toks and 2 not in toks  # no <pad>, no </s>
    zero = generate(model, batch, SearchConfig(beam=3, max_len_a=0.0, max_len_b=0))
    assert zero.tokens == [[]] * len(zero.tokens)


def test_mixed_batch_rows_decode_as_alone():
    """A row decodes the same inside a mixed-task batch as alone: tasks follow rows through expansion/compaction."""
    model, batch = make_model("text", seed=7), make_batch("text", seed=8)
    cfg = SearchConfig(beam=3, max_len_b=8)
    together = beam_search(model, batch, cfg).tokens
    for b in range(len(together)):
        n = int(batch.source_tokens[b].ne(1).sum())
        alone = TextBatch(
            batch.source_tokens[b : b + 1, :n],
            batch.decoder_input[b : b + 1],
            batch.src_task[b : b + 1],
            batch.tgt_task[b : b + 1],
        )
        assert beam_search(model, alone, cfg).tokens == [together[b]]


def test_deterministic_and_restores_train_mode():
    model, batch = make_model("s2t", seed=9), make_batch("s2t", seed=9)
    model.train()
    first = generate(model, batch, SearchConfig(beam=4, max_len_b=8))
    assert model.training
    second = generate(model, batch, SearchConfig(beam=4, max_len_b=8))
    assert first == second
