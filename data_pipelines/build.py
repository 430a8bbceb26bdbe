"""Turn a list of sample rows into a corpus dir: shards, manifest, CMVN stats, tokenizer, info.

Layout of a corpus dir:
    manifest.parquet   one row per sample (see shards.MANIFEST_COLUMNS)
    shards/<split>/<lang>-<tgt_lang>-<domain>-<NNNN>.tar
    cmvn.json          global feature mean/std over the train split (speech)
    tokenizer.model    SentencePiece with <lang> and <asr>/<st>/<mt> tags
    info.json          recipe, arguments, sizes, hours, build time, source package versions

Shards are task-pure (one split/lang/tgt_lang/domain each), so any task key maps a shard to one task and the
loader can split a task's shards across ranks and workers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import time
from collections import defaultdict

import numpy as np

from data_pipelines.shards import TarWriter, encode_flac, encode_sample, verify, write_manifest

log = logging.getLogger(__name__)
_SHARDS_PER_PROCESS = 4


def _seed(key: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha1(f"{seed}:{key}".encode()).digest()[:8], "big")


def _build_shard(job: dict) -> tuple[list[dict], dict | None, dict]:
    """Worker: synthesize (or, for imported rows, read) + write one shard.
    Returns (manifest rows, CMVN sums or None, {error kind: rows skipped})."""
    from hs_scale.data.features import CMVNAccumulator, fbank, num_frames

    writer = TarWriter(os.path.join(job["out"], job["shard"]))
    acc = CMVNAccumulator() if job["split"] == "train" and job["modality"] == "speech" else None
    rows, skipped = [], {}
    policy = job.get("audio_policy") or {}
    for r in job["rows"]:
        meta = {k: r[k] for k in ("key", "split", "lang", "tgt_lang", "domain")}
        meta.update({k: r[k] for k in ("source_id", "speaker") if r.get(k)})
        flac = feats = None
        duration, frames = 0.0, 0
        if job["modality"] == "speech":
            if r.get("audio") is not None:
                try:
                    wav = _imported_audio(r, policy)
                except ValueError as exc:
                    kind = "too_long" if str(exc).startswith("too_long") else "bad_audio"
                    if policy.get("on_error") == "raise":
                        raise ValueError(f"{kind}: row {r.get('source_id')} ({r['split']}): {exc}") from None
                    log.warning("skipping row %s: %s", r.get("source_id"), exc)
                    skipped[kind] = skipped.get(kind, 0) + 1
                    continue
            else:
                from data_pipelines.speech import synthesize_utterance

                rng = np.random.default_rng(_seed(r["key"], job["seed"]))
                wav, voice = synthesize_utterance(r["text"], r["lang"], rng, r.get("condition", "clean"))
                meta.update(voice)
            flac = encode_flac(wav)
            wav16 = wav if not job["features"] and acc is None else _pcm16(wav)
            duration, frames = len(wav) / 16000.0, num_frames(len(wav))
            if job["features"] or acc is not None:
                # NOTE: features are computed from the 16-bit-quantized waveform, i.e. exactly what decoding
                # the FLAC gives, so the precomputed and the on-the-fly paths see the same input.
                feats = fbank(wav16)
                if acc is not None:
                    acc.add(feats)
        members = encode_sample(r["text"], r.get("translation", ""), meta, flac,
                                feats if job["features"] else None)
        checksum, crc32 = writer.write(r["key"], members)
        rows.append({"key": r["key"], "shard": job["shard"], "split": r["split"], "lang": r["lang"],
                     "tgt_lang": r["tgt_lang"], "domain": r["domain"], "duration": duration, "frames": frames,
                     "text": r["text"], "translation": r.get("translation", ""), "checksum": checksum,
                     "crc32": crc32})
    writer.close()
    return rows, (None if acc is None else {"n": acc.n, "s": acc.s, "ss": acc.ss}), skipped


def _build_shards(jobs: list[dict]) -> list[tuple[list[dict], dict | None, dict]]:
    return [_build_shard(j) for j in jobs]


def _imported_audio(r: dict, policy: dict) -> np.ndarray:
    """An imported row's audio at 16 kHz, quantized to 16 bits (what the FLAC will hold)."""
    from data_pipelines.importers import load_audio

    wav = load_audio(r["audio"])
    if len(wav) / 16000.0 > policy.get("max_seconds", float("inf")):
        raise ValueError(f"too_long: {len(wav) / 16000.0:.1f} s > max {policy['max_seconds']} s")
    return _pcm16(wav)


def _progress(total: int, desc: str):
    """A tqdm bar over utterances (rate and ETA) on stderr; a build of a large corpus takes minutes."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="utt", mininterval=1.0, dynamic_ncols=True)


def _pcm16(wav: np.ndarray) -> np.ndarray:
    return (np.clip(np.round(wav * 32768.0), -32768, 32767) / 32768.0).astype(np.float32)


def build_from_rows(
    rows: list[dict], out: str, modality: str = "speech", features: bool = False, shard_size: int = 200,
    workers: int = 1, seed: int = 0, vocab_size: int = 4000, info: dict | None = None, check: bool = True,
    audio_policy: dict | None = None, skipped: dict | None = None,
) -> dict:
    """Write a corpus dir from rows {split, lang, tgt_lang, domain, text, translation[, condition]}.

    Imported rows (data_pipelines.importers) also carry `audio` (read instead of synthesized; `audio_policy`
    {max_seconds, on_error} decides about unreadable / over-long ones), `source_id` and `speaker` (kept in the
    sample's .json). `skipped`: counts of rows the caller already dropped, reported with the builder's own in
    info["import_errors"].

    Keys are assigned here: ``<lang>-<tgt_lang>-<domain>-<split>-<NNNNNN>`` (row order within a group).
    Returns the info dict (also written to info.json).
    """
    from hs_scale.data.features import CMVNAccumulator
    from hs_scale.data.tokenizer import build_tokenizer

    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        for f in ("lang", "tgt_lang", "domain", "split"):
            if not r.get(f) or "-" in r[f] or "." in r[f]:
                raise ValueError(f"row field {f}={r.get(f)!r} must be non-empty without '-' or '.'")
        groups[(r["split"], r["lang"], r["tgt_lang"], r["domain"])].append(r)
    jobs = []
    for (split, lang, tgt, dom), grp in sorted(groups.items()):
        for i, r in enumerate(grp):
            r["key"] = f"{lang}-{tgt}-{dom}-{split}-{i:06d}"
        for n, start in enumerate(range(0, len(grp), shard_size)):
            jobs.append({"out": out, "shard": f"shards/{split}/{lang}-{tgt}-{dom}-{n:04d}.tar", "split": split,
                         "rows": grp[start : start + shard_size], "modality": modality, "features": features,
                         "seed": seed, "audio_policy": audio_policy})
    if modality == "speech":
        # NOTE: libespeak-ng's output depends on the process's synthesis history (static state that neither
        # espeak_Terminate nor espeak_ng_SetRandSeed resets). Fresh processes for fixed runs of shards make every
        # utterance's length (duration, frames) a function of its row and the seed only, whatever the worker
        # count. A few samples still differ by a few LSBs between builds (not tracked down), so audio checksums
        # are not reproducible; keys, splits, texts and durations are.
        # The fresh processes come from a forkserver (a clean single-threaded process with the modules
        # preloaded), not from forking the caller: forking a process that runs pyarrow/torch threads can deadlock.
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(
            ["torch", "data_pipelines.speech", "data_pipelines.shards", "hs_scale.data.features"])
        # A task is a fixed run of _SHARDS_PER_PROCESS shards (independent of the worker count), so a shard's
        # synthesis history is fixed too; one shard per process would add ~0.5 s of process churn per shard.
        tasks = [jobs[i : i + _SHARDS_PER_PROCESS] for i in range(0, len(jobs), _SHARDS_PER_PROCESS)]
        with ctx.Pool(max(1, workers), maxtasksperchild=1) as pool, _progress(len(rows), "synthesizing") as bar:
            results = []
            for rs in pool.imap(_build_shards, tasks, chunksize=1):  # in order: the results are deterministic
                results += rs
                bar.update(sum(len(r[0]) for r in rs))
    else:
        with _progress(len(rows), "writing shards") as bar:
            results = []
            for j in jobs:
                results.append(_build_shard(j))
                bar.update(len(j["rows"]))
    manifest, acc = [], CMVNAccumulator()
    errors = dict(skipped or {})
    for rws, sums, skip in results:
        manifest += rws
        for k, v in skip.items():
            errors[k] = errors.get(k, 0) + v
        if sums:
            acc.n, acc.s, acc.ss = acc.n + sums["n"], acc.s + sums["s"], acc.ss + sums["ss"]
    write_manifest(manifest, os.path.join(out, "manifest.parquet"))
    if acc.n:
        with open(os.path.join(out, "cmvn.json"), "w") as fh:
            json.dump(acc.to_json(), fh)
    # Lines, not whole texts: SentencePiece skips training "sentences" over 4192 bytes, and an LM document
    # (data_pipelines.lm_corpus) is many paragraph lines.
    train_text = [line for r in manifest if r["split"] == "train" for c in ("text", "translation")
                  for line in r[c].split("\n") if line]
    langs = sorted({r["lang"] for r in manifest} | {r["tgt_lang"] for r in manifest} | {"en"})
    build_tokenizer(train_text or [r["text"] for r in manifest], os.path.join(out, "tokenizer"), langs,
                    vocab_size=vocab_size, seed=seed)
    split_counts = defaultdict(int)
    for r in manifest:
        split_counts[r["split"]] += 1
    info = dict(info or {})
    info.update({
        "modality": modality, "features": features, "num_samples": len(manifest), "num_shards": len(jobs),
        "splits": dict(split_counts), "langs": langs, "domains": sorted({r["domain"] for r in manifest}),
        "hours": round(sum(r["duration"] for r in manifest) / 3600.0, 4),
        "bytes": sum(os.path.getsize(os.path.join(out, j["shard"])) for j in jobs),
        "build_seconds": round(time.time() - t0, 1), "seed": seed,
    })
    if audio_policy is not None or skipped is not None:
        info["import_errors"] = errors
    if check:
        problems = verify(out)
        info["verify_problems"] = len(problems)
        if problems:
            raise RuntimeError(f"verify found {len(problems)} problems in {out}: {problems[:5]}")
    with open(os.path.join(out, "info.json"), "w") as fh:
        json.dump(info, fh, indent=1, sort_keys=True)
    return info
