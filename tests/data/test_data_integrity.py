"""Data integrity (fault injection, issue 16): silently changed samples are caught by the manifest's per-member
CRC-32, a corrupt or missing manifest names the file and the fix, error counts are unique samples per split and
kind (dev errors reach the run's result), and a task whose training shards are all missing is refused or, by
policy, dropped loudly and reported.

Run alone: python -m pytest tests/data/test_data_integrity.py -q
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os

import numpy as np
import pytest
from test_data_errors import cfg_for, manifest, rewrite_member, run_eval

from hs_scale.data import build_loader, load_tokenizer
from hs_scale.training.data_source import CorpusSource


def test_replaced_transcript_is_a_checksum_error(corpus_copy, caplog):
    r = next(r for r in manifest(corpus_copy) if r["split"] == "dev")
    rewrite_member(corpus_copy, r["shard"], r["key"] + ".txt", b"ganz anderer text", update_crc=False)
    with caplog.at_level(logging.WARNING):
        loader, keys = run_eval(corpus_copy)
    assert loader.error_counts["checksum"] == 1 and r["key"] not in keys and len(keys) == 15
    assert any(r["key"] in rec.getMessage() and ".txt does not match" in rec.getMessage() for rec in caplog.records)
    with pytest.raises(RuntimeError, match=f"checksum: sample '{r['key']}' in shard {r['shard']}"):
        run_eval(corpus_copy, on_error="raise")


def test_flipped_bytes_in_stored_features(corpus_copy):
    r = next(r for r in manifest(corpus_copy) if r["split"] == "dev")
    x = np.zeros((r["frames"], 80), np.float16)
    buf = io.BytesIO()
    np.save(buf, x)  # a well-formed, finite array: only the checksum can tell
    rewrite_member(corpus_copy, r["shard"], r["key"] + ".fbank.npy", buf.getvalue(), update_crc=False)
    loader, keys = run_eval(corpus_copy, precomputed_features=True)
    assert loader.error_counts["checksum"] == 1 and r["key"] not in keys
    # The FLAC path does not read the features member, so the same sample is fine there.
    loader, keys = run_eval(corpus_copy)
    assert loader.error_counts["checksum"] == 0 and r["key"] in keys


def test_corrupt_manifest_names_file_and_fix(corpus_copy):
    path = os.path.join(corpus_copy, "manifest.parquet")
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)
    tok = load_tokenizer(corpus_copy)
    with pytest.raises(RuntimeError, match=r"manifest .*manifest.parquet is unreadable.*prepare-data --verify"):
        build_loader(cfg_for(corpus_copy), "dev", 0, 1, tok, train=False)


def test_missing_corpus_says_so_before_the_tokenizer(tmp_path):
    missing = str(tmp_path / "nonexistent")
    with pytest.raises(FileNotFoundError, match=r"corpus manifest .*nonexistent/manifest.parquet not found.*"
                       r"prepare-data --recipe"):
        CorpusSource(cfg_for(missing), 0, 1, 1)


def test_errors_are_unique_per_split_and_kind(corpus_copy):
    rows = manifest(corpus_copy)
    bad_train = next(r for r in rows if r["split"] == "train")
    bad_dev = next(r for r in rows if r["split"] == "dev")
    for r in (bad_train, bad_dev):
        rewrite_member(corpus_copy, r["shard"], r["key"] + ".txt", b"changed", update_crc=False)
    src = CorpusSource(cfg_for(corpus_copy), 0, 1, grad_accum=1)
    for _ in range(60):  # > 3 epochs of this reader's 64 train samples: the bad one is met several times
        src.next_microbatches()
    list(src.eval_batches())
    stats = src.stats()
    assert stats["errors"] == {"train": {"checksum": 1}, "dev": {"checksum": 1}}
    # Unique across a resume too: the restored state remembers which samples were already counted.
    state = json.loads(json.dumps(src.state_dict()))
    again = CorpusSource(cfg_for(corpus_copy), 0, 1, grad_accum=1)
    again.load_state_dict(state)
    for _ in range(30):
        again.next_microbatches()
    assert again.stats()["errors"]["train"] == {"checksum": 1}


def _drop_task_shards(corpus, lang):
    for r in manifest(corpus):
        p = os.path.join(corpus, r["shard"])
        if r["split"] == "train" and r["lang"] == lang and os.path.exists(p):
            os.remove(p)


def test_task_with_all_shards_missing(corpus_copy, caplog):
    _drop_task_shards(corpus_copy, "fr")
    tok = load_tokenizer(corpus_copy)
    with pytest.raises(FileNotFoundError, match=r"every training shard of task\(s\) \['fr'\] is missing"):
        build_loader(cfg_for(corpus_copy), "train", 0, 1, tok, train=True)
    with caplog.at_level(logging.ERROR):
        loader = build_loader(cfg_for(corpus_copy, on_missing_task="warn"), "train", 0, 1, tok, train=True)
    assert any("TRAINING WITHOUT THEM" in r.getMessage() for r in caplog.records)
    batches = list(itertools.islice(iter(loader), 10))
    assert all(k.startswith("de-") for b in batches for k in b.keys)
    assert loader.stats()["missing_tasks"] == ["fr"] and loader.stats()["errors"] == {}
