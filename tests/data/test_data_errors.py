"""Bad-data policy: every bad case is counted and logged with its key under on_error=skip, and names the shard
and key under on_error=raise; a stream whose shards are all bad fails with a clear message."""

from __future__ import annotations

import io
import itertools
import logging
import os
import tarfile
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hs_scale.data import DataConfig, build_loader, load_tokenizer


def cfg_for(corpus, **kw):
    base = dict(manifest=corpus, num_workers=0, max_frames_per_batch=3000, max_tokens_per_batch=400,
                bucket_pool=64, shuffle_window=4, sampling_temperature=1.0)
    base.update(kw)
    return DataConfig(**base)


def manifest(corpus):
    return pq.read_table(os.path.join(corpus, "manifest.parquet")).to_pylist()


def write_manifest(corpus, rows):
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(corpus, "manifest.parquet"))


def rewrite_member(corpus, shard, name, data: bytes, update_crc: bool = True):
    """Replace one member's bytes in a shard (keeps the tar well-formed). update_crc=True also updates the
    manifest's CRC-32 for it (bad data that was bad at build time); False leaves a silent change behind."""
    path = os.path.join(corpus, shard)
    if update_crc:
        rows = manifest(corpus)
        key, ext = name.split(".", 1)
        row = next(r for r in rows if r["key"] == key)
        row["crc32"] = " ".join(f"{e}={zlib.crc32(data):08x}" if e == ext else f"{e}={c}"
                                for e, c in (item.split("=") for item in row["crc32"].split()))
        write_manifest(corpus, rows)
    with tarfile.open(path) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(path, "w") as tf:
        for n, d in members:
            d = data if n == name else d
            ti = tarfile.TarInfo(n)
            ti.size = len(d)
            tf.addfile(ti, io.BytesIO(d))


def dev_row(corpus):
    """A dev row (the eval loader reads every dev sample once)."""
    return next(r for r in manifest(corpus) if r["split"] == "dev")


def run_eval(corpus, **kw):
    tok = load_tokenizer(corpus)
    loader = build_loader(cfg_for(corpus, **kw), "dev", 0, 1, tok, train=False)
    keys = [k for b in loader for k in b.keys]
    return loader, keys


def check_policy(corpus, kind, key, shard, caplog, **kw):
    with caplog.at_level(logging.WARNING):
        loader, keys = run_eval(corpus, **kw)
    assert loader.error_counts[kind] == 1, dict(loader.error_counts)
    assert key not in keys and len(keys) == 15
    assert any(key in r.getMessage() and kind in r.getMessage() for r in caplog.records)
    with pytest.raises(RuntimeError) as exc:
        run_eval(corpus, on_error="raise", **kw)
    assert key in str(exc.value) and shard in str(exc.value) and kind in str(exc.value)


def test_truncated_member(corpus_copy, caplog):
    # Truncate the tar file in the middle of the last sample's members.
    rows = [r for r in manifest(corpus_copy) if r["split"] == "dev"]
    shard = rows[0]["shard"]
    in_shard = [r for r in rows if r["shard"] == shard]
    path = os.path.join(corpus_copy, shard)
    with tarfile.open(path) as tf:
        last = [m for m in tf.getmembers() if m.name.startswith(in_shard[-1]["key"])]
    cut = min(m.offset_data for m in last) + 100
    with open(path, "r+b") as fh:
        fh.truncate(cut)
    check_policy(corpus_copy, "truncated", in_shard[-1]["key"], shard, caplog)


def test_undecodable_audio(corpus_copy, caplog):
    r = dev_row(corpus_copy)
    rewrite_member(corpus_copy, r["shard"], r["key"] + ".flac", b"fLaC this is not audio" * 10)
    check_policy(corpus_copy, "bad_audio", r["key"], r["shard"], caplog)


def test_nan_features(corpus_copy, caplog):
    r = dev_row(corpus_copy)
    x = np.full((r["frames"], 80), np.nan, np.float16)
    buf = io.BytesIO()
    np.save(buf, x)
    rewrite_member(corpus_copy, r["shard"], r["key"] + ".fbank.npy", buf.getvalue())
    check_policy(corpus_copy, "nan_features", r["key"], r["shard"], caplog, precomputed_features=True)


def test_empty_text_in_manifest_and_in_shard(corpus_copy, caplog):
    rows = manifest(corpus_copy)
    dev = [r for r in rows if r["split"] == "dev"]
    dev[0]["text"] = ""
    write_manifest(corpus_copy, rows)
    check_policy(corpus_copy, "empty_text", dev[0]["key"], dev[0]["shard"], caplog)
    # The manifest is fine but the shard's transcript is empty: caught when the sample is read.
    dev[0]["text"] = "restored"
    write_manifest(corpus_copy, rows)
    rewrite_member(corpus_copy, dev[1]["shard"], dev[1]["key"] + ".txt", b"   ")
    loader, keys = run_eval(corpus_copy)
    assert loader.error_counts["empty_text"] == 1 and dev[1]["key"] not in keys


def test_over_long_text(corpus_copy, caplog):
    rows = manifest(corpus_copy)
    dev = [r for r in rows if r["split"] == "dev"]
    dev[0]["text"] = " ".join(["haus"] * 300)
    write_manifest(corpus_copy, rows)
    check_policy(corpus_copy, "too_long", dev[0]["key"], dev[0]["shard"], caplog, max_target_tokens=100)


def test_unknown_task(tiny_corpus, caplog):
    tok = load_tokenizer(tiny_corpus)
    cfg = cfg_for(tiny_corpus, tasks=["de"])
    loader = build_loader(cfg, "dev", 0, 1, tok, train=False)
    keys = [k for b in loader for k in b.keys]
    assert loader.error_counts["unknown_task"] == 8 and all(k.startswith("de-") for k in keys) and len(keys) == 8
    with pytest.raises(RuntimeError, match=r"unknown_task: sample 'fr-fr-.*' in shard shards/dev/fr"):
        build_loader(cfg.replace(on_error="raise"), "dev", 0, 1, tok, train=False)


def test_all_shards_bad_fails_clearly(corpus_copy):
    for r in manifest(corpus_copy):
        with open(os.path.join(corpus_copy, r["shard"]), "wb") as fh:
            fh.write(b"not a tar file at all" * 50)
    tok = load_tokenizer(corpus_copy)
    loader = build_loader(cfg_for(corpus_copy), "train", 0, 1, tok, train=True)
    with pytest.raises(RuntimeError, match="all .* shards this reader owns are bad"):
        list(itertools.islice(iter(loader), 5))
    # Missing files altogether are refused up front.
    for r in manifest(corpus_copy):
        p = os.path.join(corpus_copy, r["shard"])
        if os.path.exists(p):
            os.remove(p)
    with pytest.raises(FileNotFoundError, match="none of the"):
        build_loader(cfg_for(corpus_copy), "train", 0, 1, tok, train=True)


def test_skip_keeps_training_going(corpus_copy):
    """One bad shard among good ones: the infinite train loader keeps producing batches and counts errors."""
    r = next(r for r in manifest(corpus_copy) if r["split"] == "train")
    with open(os.path.join(corpus_copy, r["shard"]), "wb") as fh:
        fh.write(b"garbage" * 100)
    tok = load_tokenizer(corpus_copy)
    loader = build_loader(cfg_for(corpus_copy), "train", 0, 1, tok, train=True)
    batches = list(itertools.islice(iter(loader), 20))
    assert len(batches) == 20 and all(len(b) for b in batches)
    assert loader.error_counts["truncated"] >= 4 and r["shard"] not in str([b.keys for b in batches])
