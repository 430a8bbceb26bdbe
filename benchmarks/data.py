"""Data pipeline throughput per worker process, streaming the shards from each kind of source.

(a) FLAC decode + 80-dim filterbank + CMVN + tokenization + batching   -> utts_per_s_flac
(b) precomputed fp16 filterbanks + CMVN + tokenization + batching     -> utts_per_s_features

Each runs the real train loader with num_workers=0, i.e. exactly the work one DataLoader worker does, in one
process with one torch thread, reading the corpus from: the local disk; an HTTP server (`python -m http.server`
in a subprocess on loopback); an S3-protocol server (`moto_server` on loopback, when moto[server] is installed).
Targets on a 2-core CI CPU: >= 300 and >= 2000 utterances/s.

The old seek-based local reader was replaced by the streaming reader (no dead code kept); its numbers for the
same command are in README.md / docs/data.md ("before streaming") for comparison.

    python benchmarks/data.py --quick --json out.json
    python benchmarks/data.py --corpus data/asr8   # an existing corpus built with --features
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
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
    """corpus: a corpus location (path or URL)."""
    from hs_scale.data import DataConfig, build_loader, load_tokenizer

    cfg = DataConfig(manifest=corpus, num_workers=0, precomputed_features=precomputed, spec_augment=spec_augment,
                     max_frames_per_batch=40_000, bucket_pool=1000)
    tok = load_tokenizer(corpus)
    loader = build_loader(cfg, "train", 0, 1, tok, train=True)
    it = iter(loader)
    for _ in range(2):  # warm up: the first pool is read before its first batch
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


@contextlib.contextmanager
def sources(corpus: str, tmp: str):
    """{name: corpus location}: local, http (and s3 when moto_server is installed), servers stopped on exit."""
    procs, out = [], {"local": corpus}
    try:
        port = _free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                       "--directory", corpus], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait(port)
        out["http"] = f"http://127.0.0.1:{port}"
        moto = shutil.which("moto_server")
        if moto:
            import boto3

            port = _free_port()
            procs.append(subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
            _wait(port)
            os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                              AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
            s3 = boto3.client("s3")
            s3.create_bucket(Bucket="bench")
            for root, _, files in os.walk(corpus):
                for f in files:
                    s3.upload_file(os.path.join(root, f), "bench", os.path.relpath(os.path.join(root, f), corpus))
            out["s3"] = "s3://bench"
        else:
            print("moto_server not installed (pip install 'moto[server]'): no S3 row", file=sys.stderr)
        yield out
    finally:
        for p in procs:
            p.terminate()
            p.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(port: int) -> None:
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server on port {port} did not start")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", help="existing corpus dir built with --features (default: build a demo corpus)")
    p.add_argument("--quick", action="store_true", help="small corpus, short runs (about a minute)")
    p.add_argument("--spec-augment", action="store_true", help="include SpecAugment in the measured work")
    p.add_argument("--sources", default="local,http,s3", help="which sources to measure (comma-separated)")
    p.add_argument("--json", help="write utts_per_s_flac / utts_per_s_features (local) and per-source numbers here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    seconds = 6.0 if args.quick else 20.0
    with tempfile.TemporaryDirectory() as tmp:
        corpus = args.corpus
        if corpus is None:
            t = time.perf_counter()
            corpus = _build(os.path.join(tmp, "bench"), 300 if args.quick else 1500)
            print(f"built benchmark corpus in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        table = {}
        with sources(os.path.abspath(corpus), tmp) as where:
            for name, url in where.items():
                if name not in args.sources.split(","):
                    continue
                a = measure(url, False, seconds, args.spec_augment)
                b = measure(url, True, seconds, args.spec_augment)
                table[name] = {"utts_per_s_flac": round(a["utts_per_s"], 1),
                               "utts_per_s_features": round(b["utts_per_s"], 1),
                               "mean_seconds_audio": round(a["mean_seconds_audio"], 2)}
    first = table.get("local") or next(iter(table.values()))
    res = {"utts_per_s_flac": first["utts_per_s_flac"], "utts_per_s_features": first["utts_per_s_features"],
           "mean_seconds_audio": first["mean_seconds_audio"], "spec_augment": args.spec_augment,
           "sources": table, "targets": {"utts_per_s_flac": 300, "utts_per_s_features": 2000}}
    print(f"{'source':8s} {'(a) FLAC + fbank':>18s} {'(b) stored fbank':>18s}   utt/s per worker (targets 300 / 2000)")
    for name, r in table.items():
        print(f"{name:8s} {r['utts_per_s_flac']:18.1f} {r['utts_per_s_features']:18.1f}")
    print(f"mean utterance {res['mean_seconds_audio']} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
