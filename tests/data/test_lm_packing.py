"""Document packing (hs_scale.data.packing) and the LM stream loader (hs_scale.data.lm_loader): invariants,
determinism and exact resume."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from lm_helpers import build_tiny_lm_corpus

from hs_scale.data import DataConfig, build_loader, load_tokenizer
from hs_scale.data.packing import IGNORE_INDEX, fill_rows, pack_pieces

PAD = 1


def _docs(n: int, seed: int = 0) -> dict[int, tuple[np.ndarray, int]]:
    """Documents whose tokens name them: token = 1000 * (doc + 1) + offset (traceable after packing)."""
    rng = np.random.default_rng(seed)
    return {d: (1000 * (d + 1) + np.arange(int(rng.integers(1, 40))), d % 3) for d in range(n)}


def _check_batch(b, docs, seq_len):
    """Every invariant of one packed batch against the source documents; returns {doc: positions seen}."""
    seen: dict[int, list[int]] = {}
    cu, maxlen = b.cu_seqlens()
    assert cu[0] == 0 and cu[-1] == b.input_ids.numel() and maxlen <= seq_len
    for r in range(len(b)):
        ids, tgt, pos, seg, task = (x[r].tolist() for x in (b.input_ids, b.targets, b.position_ids, b.doc_ids,
                                                             b.task_ids))
        assert seg[0] == 0 and all(0 <= s1 - s0 <= 1 for s0, s1 in zip(seg, seg[1:], strict=False))
        for p in range(seq_len):
            new_seg = p == 0 or seg[p] != seg[p - 1]
            assert pos[p] == (0 if new_seg else pos[p - 1] + 1)  # positions restart per segment
            if ids[p] == PAD:  # end-of-stream padding: no target
                assert tgt[p] == IGNORE_INDEX
                continue
            d, off = ids[p] // 1000 - 1, ids[p] % 1000
            toks, t = docs[d]
            assert task[p] == t  # each token carries its own document's task
            if not new_seg:
                assert ids[p - 1] == ids[p] - 1  # a segment is one contiguous piece of one document
            # The target is the same document's next token; a document's last token predicts nothing.
            assert tgt[p] == (toks[off + 1] if off + 1 < len(toks) else IGNORE_INDEX)
            seen.setdefault(d, []).append(off)
    return seen


@pytest.mark.parametrize("seq_len", [1, 7, 64])
def test_packing_invariants_every_token_once(seq_len):
    docs = _docs(50)
    rows = list(pack_pieces([len(docs[d][0]) for d in range(len(docs))], seq_len))
    assert all(sum(p.stop - p.start for p in r) == seq_len for r in rows[:-1])  # full rows but the last
    seen: dict[int, list[int]] = {}
    for i in range(0, len(rows), 3):
        b = fill_rows(rows[i : i + 3], docs, seq_len, PAD)
        for d, offs in _check_batch(b, docs, seq_len).items():
            seen.setdefault(d, []).extend(offs)
    # Every token of every document is an input exactly once, in order (split documents continue).
    assert seen == {d: list(range(len(docs[d][0]))) for d in docs}
    total_targets = sum(len(t) - 1 for t, _ in docs.values())
    assert sum(int((fill_rows(rows[i : i + 3], docs, seq_len, PAD).targets != IGNORE_INDEX).sum())
               for i in range(0, len(rows), 3)) == total_targets


def test_packed_batch_fields():
    docs = {0: (np.array([10, 11, 12]), 2), 1: (np.array([20, 21, 22, 23, 24]), 0)}
    (row,) = list(pack_pieces([3, 5], 8))
    b = fill_rows([row], docs, 8, PAD, keys={0: "a", 1: "b"})
    assert b.input_ids.tolist() == [[10, 11, 12, 20, 21, 22, 23, 24]]
    assert b.targets.tolist() == [[11, 12, -100, 21, 22, 23, 24, -100]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    assert b.doc_ids.tolist() == [[0, 0, 0, 1, 1, 1, 1, 1]]
    assert b.task_ids.tolist() == [[2, 2, 2, 0, 0, 0, 0, 0]]
    assert b.keys == ["a", "b"] and b.num_tokens == 6 and b.task_token_counts(3).tolist() == [4, 0, 2]
    cu, maxlen = b.cu_seqlens()
    assert cu.tolist() == [0, 3, 8] and cu.dtype == torch.int32 and maxlen == 5
    # A split document: its last token in the first row predicts its first token in the next row.
    r1, r2 = list(pack_pieces([3, 5], 6))
    b = fill_rows([r1, r2], docs, 6, PAD)
    assert b.targets[0, -1] == 23 and b.input_ids[1, 0] == 23 and b.position_ids[1, 0] == 0
    assert b.input_ids[1].tolist() == [23, 24, PAD, PAD, PAD, PAD] and b.doc_ids[1].tolist() == [0, 0, 1, 1, 1, 1]
    assert b.targets[1].tolist() == [24, -100, -100, -100, -100, -100]
    assert b.to("cpu").input_ids.data_ptr() == b.input_ids.data_ptr() and len(b) == 2


# ---- the loader on a corpus built by the recipe -------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_corpus(tmp_path_factory):
    return build_tiny_lm_corpus(str(tmp_path_factory.mktemp("lmp")))


def _cfg(corpus, **kw):
    base = dict(manifest=corpus, modality="lm", seq_len=32, max_tokens_per_batch=96, num_workers=0,
                shuffle_window=4)
    return DataConfig(**{**base, **kw})


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip((a.input_ids, a.targets, a.position_ids, a.doc_ids, a.task_ids),
                                                 (b.input_ids, b.targets, b.position_ids, b.doc_ids, b.task_ids),
                                                 strict=True)) and a.keys == b.keys


def _source_docs(corpus, tok, loader):
    """{key: (BOS + tokens + EOS, task id)} of every document, from the manifest."""
    from hs_scale.data.manifest import read_manifest

    m = read_manifest(os.path.join(corpus, "manifest.parquet"))
    return {k: ([tok.bos_id] + tok.encode(t) + [tok.eos_id], loader.tasks.id(lg))
            for k, t, lg in zip(m["key"], m["text"], m["lang"], strict=True)}


def test_loader_batches_follow_the_documents(lm_corpus):
    tok = load_tokenizer(lm_corpus)
    loader = build_loader(_cfg(lm_corpus), "train", 0, 1, tok, train=True)
    assert loader.tasks.names == ["de", "en", "hi"]
    src = _source_docs(lm_corpus, tok, loader)
    key, off = None, 0  # the document being packed and how many of its tokens were packed before
    for b in _take(loader, 12):
        assert b.input_ids.shape == (3, 32) and b.num_tokens > 0
        # Walk the segments in packing order through the documents named by b.keys.
        ki = 0 if key is not None and off < len(src[key][0]) else -1
        assert ki < 0 or b.keys[0] == key  # a split document continues at the start of the next batch
        for r in range(3):
            for s in b.doc_ids[r].unique().tolist():
                at = (b.doc_ids[r] == s).nonzero().flatten()
                if ki < 0 or off == len(src[b.keys[ki]][0]):
                    ki, off = ki + 1, 0
                toks, task = src[b.keys[ki]]
                ids = b.input_ids[r, at].tolist()
                assert ids == toks[off : off + len(ids)]
                assert (b.task_ids[r, at] == task).all()
                assert b.targets[r, at].tolist() == (toks[off + 1 : off + len(ids) + 1] + [IGNORE_INDEX])[: len(ids)]
                off += len(ids)
        assert ki == len(b.keys) - 1
        key = b.keys[ki]


def test_loader_deterministic_and_seeded(lm_corpus):
    tok = load_tokenizer(lm_corpus)
    a = _take(build_loader(_cfg(lm_corpus), "train", 0, 1, tok, train=True), 6)
    b = _take(build_loader(_cfg(lm_corpus), "train", 0, 1, tok, train=True), 6)
    c = _take(build_loader(_cfg(lm_corpus, seed=1), "train", 0, 1, tok, train=True), 6)
    assert all(_same(x, y) for x, y in zip(a, b, strict=True))
    assert not all(_same(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_stream_gives_the_same_batches(lm_corpus, workers):
    tok = load_tokenizer(lm_corpus)
    cfg = _cfg(lm_corpus, num_workers=workers, worker_start_method="fork" if workers else "")
    full = _take(build_loader(cfg, "train", 0, 1, tok, train=True), 14)
    first = build_loader(cfg, "train", 0, 1, tok, train=True)
    _take(first, 5)
    state = first.state_dict()
    resumed = build_loader(cfg, "train", 0, 1, tok, train=True)
    resumed.load_state_dict(state)
    again = _take(resumed, 9)
    assert all(_same(x, y) for x, y in zip(full[5:], again, strict=True))
    assert resumed.stats()["tokens"] == sum(b.num_tokens for b in full)
    with pytest.raises(ValueError, match="seq_len"):
        build_loader(cfg.replace(seq_len=16), "train", 0, 1, tok, train=True).load_state_dict(state)


def test_eval_covers_every_token_once_over_ranks(lm_corpus):
    tok = load_tokenizer(lm_corpus)
    cfg = _cfg(lm_corpus)
    per_rank = [list(build_loader(cfg, "dev", r, 2, tok, train=False)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])  # same step count on every rank
    got = sum(b.num_tokens for bs in per_rank for b in bs if not b.is_padding)
    loader = build_loader(cfg, "dev", 0, 1, tok, train=False)
    from hs_scale.data.manifest import read_manifest

    m = read_manifest(os.path.join(lm_corpus, "manifest.parquet"), ["split", "text"])
    want = sum(len(tok.encode(t)) + 1 for s, t in zip(m["split"], m["text"], strict=True) if s == "dev")
    assert got == want == sum(b.num_tokens for b in loader)  # BOS..EOS: every token but BOS is a target once


def test_unreadable_document_becomes_padding_and_keeps_the_plan(lm_corpus, tmp_path):
    import shutil

    from hs_scale.data.manifest import read_manifest

    bad = str(tmp_path / "c")
    shutil.copytree(lm_corpus, bad)
    m = read_manifest(os.path.join(bad, "manifest.parquet"), ["split", "shard"])
    shard = next(s for s, sp in zip(m["shard"], m["split"], strict=True) if sp == "dev")
    os.remove(os.path.join(bad, shard))
    tok = load_tokenizer(bad)
    good = list(build_loader(_cfg(lm_corpus), "dev", 0, 1, tok, train=False))
    loader = build_loader(_cfg(bad), "dev", 0, 1, tok, train=False)
    got = list(loader)
    assert len(got) == len(good) and loader.error_counts["io_error"] > 0
    assert all(torch.equal(g.doc_ids, b.doc_ids) for g, b in zip(good, got, strict=True))  # same plan
    assert sum(b.num_tokens for b in got) < sum(b.num_tokens for b in good)
    with pytest.raises(RuntimeError, match="on_error=raise"):
        list(build_loader(_cfg(bad, on_error="raise"), "dev", 0, 1, tok, train=False))


def test_config_refuses_bad_seq_len():
    with pytest.raises(ValueError, match="seq_len=1"):
        DataConfig(modality="lm", seq_len=1)
    with pytest.raises(ValueError, match="seq_len=9000"):
        DataConfig(modality="lm", seq_len=9000, max_tokens_per_batch=8000)
