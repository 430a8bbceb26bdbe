"""Data pipeline throughput per worker process.

(a) FLAC decode + 80-dim filterbank + CMVN + tokenization + batching   -> utts_per_s_flac
(b) precomputed fp16 filterbanks + CMVN + tokenization + batching     -> utts_per_s_features

Both run the real train loader with num_workers=0, i.e. exactly the work one DataLoader worker does, in one
process with one torch thread. Targets on a 2-core CI CPU: >= 300 and >= 2000 utterances/s.

    python benchmarks/data.py --quick --json out.json
    python benchmarks/data.py --corpus data/asr8   # an existing corpus built with --features
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch


def _build(out: str, size: int) -> str:
    from data_pipelines import text_sources as ts
    from data_pipelines.build import build_from_rows
    from data_pipelines.recipes import build_recipe

    if ts.pairs_from_tree("/", "de"):
        build_recipe("demo", out, workers=min(2, os.cpu_count() or 1), size=size, dev_size=6, test_size=6,
                     features=True)
    else:  # no installed catalogs: synthetic sentences of similar length
        import random

        rnd = random.Random(0)
        words = "datei fenster öffnen schließen speichern drucken neue alte große kleine bild text".split()
        rows = [dict(split="train", lang="de", tgt_lang="de", domain="ui",
                     text=" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 12))), translation="")
                for _ in range(size)]
        build_from_rows(rows, out, features=True, workers=2, vocab_size=500)
    return out


def measure(corpus: str, precomputed: bool, seconds: float, spec_augment: bool) -> dict:
    from hs_scale.data import DataConfig, build_loader, load_tokenizer

    cfg = DataConfig(manifest=corpus, num_workers=0, precomputed_features=precomputed, spec_augment=spec_augment,
                     max_frames_per_batch=40_000, bucket_pool=1000)
    tok = load_tokenizer(corpus)
    loader = build_loader(cfg, "train", 0, 1, tok, train=True)
    it = iter(loader)
    for _ in range(2):  # warm up: file handles, tar indexes, first plan pool
        next(it)
    n = frames = batches = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = next(it)
        n += len(b)
        frames += int(b.feature_lengths.sum())
        batches += 1
    dt = time.perf_counter() - t0
    return {"utts_per_s": n / dt, "batches": batches, "utts": n, "mean_seconds_audio": frames / max(n, 1) / 100}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", help="existing corpus dir built with --features (default: build a demo corpus)")
    p.add_argument("--quick", action="store_true", help="small corpus, short runs (under a minute)")
    p.add_argument("--spec-augment", action="store_true", help="include SpecAugment in the measured work")
    p.add_argument("--json", help="write utts_per_s_flac / utts_per_s_features here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    seconds = 6.0 if args.quick else 20.0
    with tempfile.TemporaryDirectory() as tmp:
        corpus = args.corpus
        if corpus is None:
            t = time.perf_counter()
            corpus = _build(os.path.join(tmp, "bench"), 300 if args.quick else 1500)
            print(f"built benchmark corpus in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        a = measure(corpus, False, seconds, args.spec_augment)
        b = measure(corpus, True, seconds, args.spec_augment)
    res = {"utts_per_s_flac": round(a["utts_per_s"], 1), "utts_per_s_features": round(b["utts_per_s"], 1),
           "mean_seconds_audio": round(a["mean_seconds_audio"], 2), "spec_augment": args.spec_augment,
           "targets": {"utts_per_s_flac": 300, "utts_per_s_features": 2000}}
    print(f"(a) FLAC + fbank + batching:      {res['utts_per_s_flac']:8.1f} utts/s per worker (target >= 300)")
    print(f"(b) precomputed fbank + batching: {res['utts_per_s_features']:8.1f} utts/s per worker (target >= 2000)")
    print(f"    mean utterance {res['mean_seconds_audio']} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
