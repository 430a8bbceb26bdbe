"""Streaming loader: batch contents, rank x worker splitting, identical replicas, exact resume, sampling."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from hs_scale.data import Batch, DataConfig, build_loader, load_tokenizer
from hs_scale.data.plan import stream_probs
from hs_scale.tasks import TaskVocab


def cfg_for(corpus, **kw):
    base = dict(manifest=corpus, num_workers=0, max_frames_per_batch=3000, max_tokens_per_batch=400,
                max_source_frames=3000, bucket_pool=64, shuffle_window=4, sampling_temperature=1.0)
    base.update(kw)
    return DataConfig(**base)


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def train_keys(corpus):
    m = pq.read_table(f"{corpus}/manifest.parquet", columns=["key", "split"]).to_pylist()
    return {r["key"] for r in m if r["split"] == "train"}


def test_batch_contents(tiny_corpus):
    tok = load_tokenizer(tiny_corpus)
    loader = build_loader(cfg_for(tiny_corpus), "train", 0, 1, tok, train=True)
    assert loader.tasks.names == ["de", "fr"]
    b = take(loader, 1)[0]
    assert isinstance(b, Batch) and len(b.keys) == b.features.shape[0] > 0
    B, T, D = b.features.shape
    assert D == 80 and b.features.dtype == torch.float32 and int(b.feature_lengths.max()) == T
    assert b.decoder_input.shape == b.target.shape and b.decoder_input.dtype == torch.long
    for i, key in enumerate(b.keys):
        lang = key.split("-")[0]
        n = int(b.target_lengths[i])
        assert b.decoder_input[i, 0] == tok.lang_tag_id(lang)
        assert torch.equal(b.decoder_input[i, 1:n], b.target[i, : n - 1])  # shifted by one
        assert b.target[i, n - 1] == tok.eos_id and (b.target[i, n:] == tok.pad_id).all()
        assert b.src_task[i] == b.tgt_task[i] == loader.tasks.id(lang)
    assert b.num_target_tokens == int(b.target_lengths.sum())
    assert b.features.shape[0] * T <= 3000
    moved = b.to("cpu")
    assert torch.equal(moved.features, b.features) and moved.keys == b.keys


def test_task_keys_domain_and_composite(tiny_corpus):
    tok = load_tokenizer(tiny_corpus)
    for key_type, names in (("domain", ["cli", "ui"]), ("lang+domain", ["de+cli", "de+ui", "fr+cli", "fr+ui"])):
        loader = build_loader(cfg_for(tiny_corpus, task_key=key_type), "train", 0, 1, tok, train=True)
        assert loader.tasks.names == names
        for b in take(loader, 3):
            for k, t in zip(b.keys, b.src_task.tolist(), strict=True):
                lang, _, dom = k.split("-")[:3]
                assert loader.tasks.names[t] == (dom if key_type == "domain" else f"{lang}+{dom}")


def test_translation_target_and_text_modality(tmp_path):
    from data_helpers import make_rows

    from data_pipelines.build import build_from_rows

    out = str(tmp_path / "st")
    build_from_rows(make_rows(n_train=4, n_dev=1, tgt="en"), out, modality="text", shard_size=4, vocab_size=100)
    tok = load_tokenizer(out)
    loader = build_loader(cfg_for(out, modality="text"), "train", 0, 1, tok, train=True)
    assert loader.tasks.names == ["de", "en", "fr"]
    man = {r["key"]: r for r in pq.read_table(f"{out}/manifest.parquet").to_pylist()}
    b = take(loader, 1)[0]
    assert b.features is None and b.source_tokens.shape[0] == len(b.keys)
    for i, k in enumerate(b.keys):
        assert tok.decode(b.target[i].tolist()) == man[k]["translation"]
        assert tok.decode(b.source_tokens[i].tolist()) == man[k]["text"]
        assert b.decoder_input[i, 0] == tok.lang_tag_id("en") and b.tgt_task[i] == loader.tasks.id("en")


@pytest.mark.slow
def test_two_ranks_two_workers_disjoint_and_cover(tiny_corpus):
    tok = load_tokenizer(tiny_corpus)
    cfg = cfg_for(tiny_corpus, num_workers=2)
    seen = []
    for rank in range(2):
        loader = build_loader(cfg, "train", rank, 2, tok, train=True)
        keys = [k for b in take(loader, 40) for k in b.keys]
        seen.append(set(keys))
    assert not (seen[0] & seen[1]), "ranks must read disjoint shards"
    assert seen[0] | seen[1] == train_keys(tiny_corpus)
    # Eval: every dev sample exactly once over ranks, same number of steps on every rank.
    per_rank = []
    for rank in range(2):
        ev = build_loader(cfg, "dev", rank, 2, tok, train=False)
        batches = list(ev)
        assert len(batches) == len(ev)
        per_rank.append(batches)
    assert len(per_rank[0]) == len(per_rank[1])
    real = [k for bs in per_rank for b in bs if not b.is_padding for k in b.keys]
    assert len(real) == len(set(real)) == 16


def test_readers_split_by_rank_and_worker(tiny_corpus):
    from hs_scale.data.plan import reader_rows

    tok = load_tokenizer(tiny_corpus)
    meta = build_loader(cfg_for(tiny_corpus), "train", 0, 1, tok, True).meta
    owned = []
    for reader in range(4):  # 2 ranks x 2 workers
        rows = reader_rows(meta, reader, 4)
        owned.append({meta.shards[int(meta.shard_idx[u[0]])] for us in rows.values() for u in us})
    assert all(owned) and sum(len(o) for o in owned) == len(set().union(*owned)) == len(meta.shards)


def test_replicas_of_one_dp_rank_get_identical_batches(tiny_corpus):
    tok = load_tokenizer(tiny_corpus)
    cfg = cfg_for(tiny_corpus)
    a, b = (take(build_loader(cfg, "train", 1, 2, tok, True), 6) for _ in range(2))
    for x, y in zip(a, b, strict=True):
        assert x.keys == y.keys and torch.equal(x.features, y.features)


@pytest.mark.slow
@pytest.mark.parametrize("workers,method", [(0, ""), (2, "fork"), (2, "spawn")])
def test_exact_resume(tiny_corpus, workers, method):
    tok = load_tokenizer(tiny_corpus)
    cfg = cfg_for(tiny_corpus, num_workers=workers, worker_start_method=method, spec_augment=True)
    full = take(build_loader(cfg, "train", 0, 2, tok, True), 9 if workers else 12)
    n = 5
    first = build_loader(cfg, "train", 0, 2, tok, True)
    head = take(first, n)
    state = json.loads(json.dumps(first.state_dict()))  # plain types only
    resumed = build_loader(cfg, "train", 0, 2, tok, True)
    resumed.load_state_dict(state)
    tail = take(resumed, len(full) - n)
    assert [b.keys for b in head + tail] == [b.keys for b in full]
    for x, y in zip(head + tail, full, strict=True):
        assert torch.equal(x.features, y.features) and torch.equal(x.target, y.target)
    assert resumed.state_dict()["consumed"] == len(full)


def test_resume_refuses_other_layout(tiny_corpus):
    tok = load_tokenizer(tiny_corpus)
    loader = build_loader(cfg_for(tiny_corpus), "train", 0, 2, tok, True)
    state = loader.state_dict()
    other = build_loader(cfg_for(tiny_corpus, num_workers=2), "train", 0, 2, tok, True)
    with pytest.raises(ValueError, match="num_workers"):
        other.load_state_dict(state)
    torch.save(state, "/dev/null")  # also torch.save-able


def test_homogeneous_batches_and_budgets(tiny_corpus):
    tok = load_tokenizer(tiny_corpus)
    cfg = cfg_for(tiny_corpus, batch_mode="homogeneous", task_key="lang+domain")
    for b in take(build_loader(cfg, "train", 0, 1, tok, True), 12):
        assert b.homogeneous
        assert b.features.shape[0] * b.features.shape[1] <= cfg.max_frames_per_batch
        assert b.target.numel() <= cfg.max_tokens_per_batch


def test_temperature_sampling():
    from hs_scale.data.plan import Meta

    stream = np.array([0] * 900 + [1] * 100)
    meta = Meta(keys=[""] * 1000, shards=[], shard_idx=stream, src_len=stream, tgt_len=stream, stream=stream,
                src_task=stream, tgt_task=stream, tgt_lang=[], use_translation=stream.astype(bool),
                stream_names=["big", "small"])
    np.testing.assert_allclose(stream_probs(meta, 1.0, {}), [0.9, 0.1])
    np.testing.assert_allclose(stream_probs(meta, 2.0, {}), [3 / 4, 1 / 4])
    np.testing.assert_allclose(stream_probs(meta, 1e9, {}), [0.5, 0.5], atol=1e-6)
    np.testing.assert_allclose(stream_probs(meta, 1.0, {"small": 9.0}), [0.5, 0.5])


def test_sampling_follows_temperature(tmp_path):
    from data_helpers import make_rows

    from data_pipelines.build import build_from_rows

    rows = [r for r in make_rows(domains=("ui",), n_train=40, n_dev=1) if r["lang"] == "de" or r["split"] == "dev"]
    rows += [r for r in make_rows(domains=("ui",), n_train=10, n_dev=1, seed=1) if r["lang"] == "fr"]
    out = str(tmp_path / "c")
    build_from_rows(rows, out, modality="text", shard_size=8, vocab_size=100)
    tok = load_tokenizer(out)
    for temp, p_fr in ((1.0, 0.2), (100.0, 0.5)):
        cfg = cfg_for(out, modality="text", sampling_temperature=temp, bucket_pool=200)
        loader = build_loader(cfg, "train", 0, 1, tok, True)
        ids = torch.cat([b.src_task for b in take(loader, 60)])
        frac = float((ids == loader.tasks.id("fr")).float().mean())
        assert abs(frac - p_fr) < 0.08, (temp, frac)


def test_precomputed_features_match_flac(tiny_corpus):
    tok = load_tokenizer(tiny_corpus)
    a = next(iter(build_loader(cfg_for(tiny_corpus, spec_augment=False), "dev", 0, 1, tok, False)))
    b = next(iter(build_loader(cfg_for(tiny_corpus, precomputed_features=True), "dev", 0, 1, tok, False)))
    assert a.keys == b.keys
    torch.testing.assert_close(a.features, b.features, atol=0.05, rtol=0.01)  # fp16 storage


def test_config_validation_messages():
    with pytest.raises(ValueError, match="batch_mode"):
        DataConfig(manifest="x", batch_mode="sorted")
    with pytest.raises(ValueError, match="task_key"):
        DataConfig(manifest="x", task_key="speaker")
    with pytest.raises(ValueError, match="max_source_frames"):
        DataConfig(manifest="x", max_source_frames=10**6)
    assert TaskVocab(["a", "b"]).id("b") == 1
