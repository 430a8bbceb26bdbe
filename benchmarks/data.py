"""Data pipeline throughput per worker process: the old local seek reader and the streaming reader, side by side,
and streaming from each kind of source.

(a) FLAC decode + 80-dim filterbank + CMVN + tokenization + batching   -> utts_per_s_flac
(b) precomputed fp16 filterbanks + CMVN + tokenization + batching     -> utts_per_s_features

Each runs the real train loader with num_workers=0, i.e. exactly the work one DataLoader worker does, in one
process with one torch thread, reading the corpus with:
- `seek`: the reader the loader had before streaming (`SeekReader` below: tar member offsets indexed once per
  shard with tarfile, then seek + read; local files only, no CRC-32 check, as it was), put in place of the
  streaming reader in the same loader, so the rows differ only in how shard bytes are read;
- `local`: the streaming reader on the local disk (CRC-32 checked);
- `http`: an HTTP server (`python -m http.server` in a subprocess on loopback);
- `s3`: an S3-protocol server (`moto_server` on loopback, when moto[server] is installed).
`seek` and `local` are measured alternately `--repeat` times (the machine's load drifts), and their median ratio
is reported, in wall-clock utt/s and in utt per CPU-second of the process (the stable measure on a shared, loaded
machine). `reader_costs` also times the two readers alone (no decoding) on a first pass and on re-reads.
Targets on a 2-core CI CPU: >= 300 and >= 2000 utterances/s.

    python benchmarks/data.py --quick --json out.json
    python benchmarks/data.py --corpus data/asr8   # an existing corpus built with --features
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from unittest import mock

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


class SeekReader:
    """The loader's local reader before streaming (kept here only as the benchmark's baseline): each shard's member
    offsets are indexed once (tarfile scans the 512-byte headers), then each sample's members are read with seek +
    read. Same interface as hs_scale.data.shards.StreamReader; no retries (local files), no damage handling."""

    def __init__(self, corpus: str, wanted: dict, retries: int = 0, timeout: float = 0.0, max_open: int = 8,
                 exts: set[str] | None = None):
        self.root, self.exts, self.max_open = corpus, exts, max_open
        self._index: dict[str, dict[str, dict[str, tuple[int, int]]]] = {}
        self._fh: collections.OrderedDict = collections.OrderedDict()

    def _shard_index(self, shard: str) -> dict[str, dict[str, tuple[int, int]]]:
        if shard not in self._index:
            index: dict[str, dict[str, tuple[int, int]]] = collections.defaultdict(dict)
            with tarfile.open(os.path.join(self.root, shard), mode="r:") as tf:
                for m in tf:
                    base = os.path.basename(m.name)
                    if m.isfile() and "." in base:
                        key, ext = base.split(".", 1)
                        index[key][ext] = (m.offset_data, m.size)
            self._index[shard] = dict(index)
        return self._index[shard]

    def get(self, shard: str, key: str) -> dict[str, bytes]:
        members = self._shard_index(shard)[key]
        fh = self._fh.pop(shard, None)
        if fh is None:
            fh = open(os.path.join(self.root, shard), "rb")
            if len(self._fh) >= self.max_open:
                self._fh.popitem(last=False)[1].close()
        self._fh[shard] = fh
        out = {}
        for ext, (off, size) in members.items():
            if self.exts is None or ext in self.exts:
                fh.seek(off)
                out[ext] = fh.read(size)
        return out

    def total_opens(self) -> int:
        return len(self._index)

    def close(self) -> None:
        for fh in self._fh.values():
            fh.close()
        self._fh.clear()


def measure(corpus: str, precomputed: bool, seconds: float, spec_augment: bool, seek: bool = False) -> dict:
    """corpus: a corpus location (path or URL). seek: read it with SeekReader (local only, no CRC check)."""
    from hs_scale.data import DataConfig, build_loader, load_tokenizer
    from hs_scale.data import loader as loader_mod

    cfg = DataConfig(manifest=corpus, num_workers=0, precomputed_features=precomputed, spec_augment=spec_augment,
                     max_frames_per_batch=40_000, bucket_pool=1000)
    tok = load_tokenizer(corpus)
    with contextlib.ExitStack() as stack:
        if seek:
            stack.enter_context(mock.patch.object(loader_mod, "StreamReader", SeekReader))
            stack.enter_context(mock.patch.object(loader_mod, "check_crcs", lambda *args: None))
        loader = build_loader(cfg, "train", 0, 1, tok, train=True)
        it = iter(loader)
        for _ in range(2):  # warm up: the first pool is read before its first batch
            next(it)
        n = frames = batches = 0
        t0, c0 = time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds:
            b = next(it)
            n += len(b)
            frames += int(b.feature_lengths.sum())
            batches += 1
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        it.close()
    # utts per CPU second: this process's own CPU time, the stable measure on a shared, overloaded machine
    return {"utts_per_s": n / dt, "utts_per_cpu_s": n / cpu, "batches": batches, "utts": n,
            "mean_seconds_audio": frames / max(n, 1) / 100}


def measure_pair(corpus: str, precomputed: bool, seconds: float, spec_augment: bool) -> dict[str, dict]:
    """The seek and the streaming reader side by side: two loaders with the same plan (so the same batches) in
    this process, advanced one batch each in turn (who goes first alternates), each next() timed alone. Load
    drift and cache pollution then hit both alike, batch by batch, which 8-second blocks one after the other do
    not on a shared machine. Every pair of batches is checked to be identical. Returns {"seek": r, "local": r}
    with measure()'s fields, and "ratio": local over seek in utt per CPU-second (same batches: the CPU ratio)."""
    from hs_scale.data import DataConfig, build_loader, load_tokenizer
    from hs_scale.data import loader as loader_mod

    cfg = DataConfig(manifest=corpus, num_workers=0, precomputed_features=precomputed, spec_augment=spec_augment,
                     max_frames_per_batch=40_000, bucket_pool=1000)
    tok = load_tokenizer(corpus)
    # The loader looks both names up at call time: swapped before each next() of the seek loader, restored after.
    real = loader_mod.StreamReader, loader_mod.check_crcs
    readers = {"seek": (SeekReader, lambda *args: None), "local": real}
    its = {name: iter(build_loader(cfg, "train", 0, 1, tok, train=True)) for name in readers}
    acc = {name: [0, 0, 0.0, 0.0] for name in readers}  # utts, frames, wall s, CPU s
    try:
        for i in itertools.count():
            order = ("seek", "local") if i % 2 else ("local", "seek")
            got = {}
            for name in order:
                loader_mod.StreamReader, loader_mod.check_crcs = readers[name]
                t0, c0 = time.perf_counter(), time.process_time()
                b = got[name] = next(its[name])
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
                loader_mod.StreamReader, loader_mod.check_crcs = real
                if i >= 2:  # warm up: the first pool is read before its first batch
                    a = acc[name]
                    a[0], a[1], a[2], a[3] = a[0] + len(b), a[1] + int(b.feature_lengths.sum()), a[2] + dt, a[3] + cpu
            if got["seek"].keys != got["local"].keys or not torch.equal(got["seek"].features, got["local"].features):
                raise AssertionError(f"batch {i}: the seek and the streaming reader gave different batches")
            if i >= 2 and acc["seek"][2] + acc["local"][2] >= 2 * seconds:
                break
    finally:
        loader_mod.StreamReader, loader_mod.check_crcs = real
        for it in its.values():
            it.close()
    out = {name: {"utts_per_s": n / wall, "utts_per_cpu_s": n / cpu, "utts": n, "mean_seconds_audio": f / n / 100}
           for name, (n, f, wall, cpu) in acc.items()}
    out["ratio"] = out["local"]["utts_per_cpu_s"] / out["seek"]["utts_per_cpu_s"]
    return out


def reader_costs(corpus: str, passes: int = 3) -> dict:
    """The readers alone, without decoding: CPU microseconds per sample to fetch every train sample's stored-feature
    members (txt, translation.txt, fbank.npy) in shard order, on the first pass (seek: tarfile indexing; streaming:
    header parsing) and on re-reads (median of `passes`; seek: seek + read; streaming: its recorded layout)."""
    from hs_scale.data.shards import StreamReader, iter_samples

    exts = {"txt", "translation.txt", "fbank.npy"}
    keys: list[tuple[str, str]] = []
    for root, _, files in sorted(os.walk(os.path.join(corpus, "shards"))):
        for f in sorted(files):
            shard = os.path.relpath(os.path.join(root, f), corpus)
            with open(os.path.join(corpus, shard), "rb") as fh:
                keys += [(shard, k) for k, _ in iter_samples(fh, shard, exts)]
    wanted: dict[str, set[str]] = {}
    for shard, k in keys:
        wanted.setdefault(shard, set()).add(k)
    out = {}
    for name, reader in (("seek", SeekReader(corpus, wanted, exts=exts)), ("local", StreamReader(corpus, wanted,
                                                                                                   exts=exts))):
        times = []
        for _ in range(1 + passes):
            c0 = time.process_time()
            for shard, k in keys:
                reader.get(shard, k)
            times.append((time.process_time() - c0) / len(keys) * 1e6)
        reader.close()
        out[name] = {"first_pass_us": round(times[0], 1), "reread_us": round(statistics.median(times[1:]), 1)}
    return out


@contextlib.contextmanager
def sources(corpus: str, remote: list[str]):
    """{name: corpus location}: local, plus those of `remote` ("http", "s3") that can run (s3 needs moto_server);
    servers stopped on exit."""
    procs, out = [], {"local": corpus}
    try:
        if "http" in remote:
            port = _free_port()
            procs.append(subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                           "--directory", corpus], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
            _wait(port)
            out["http"] = f"http://127.0.0.1:{port}"
        moto = shutil.which("moto_server")
        if "s3" in remote and moto:
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
        elif "s3" in remote:
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
    p.add_argument("--quick", action="store_true", help="small corpus, short runs (about two minutes)")
    p.add_argument("--spec-augment", action="store_true", help="include SpecAugment in the measured work")
    p.add_argument("--sources", default="seek,local,http,s3", help="which readers/sources to measure (comma-separated)")
    p.add_argument("--repeat", type=int, default=3, help="run seek and local side by side this many times (median)")
    p.add_argument("--kinds", default="flac,features", help="which feature kinds to measure: flac, features")
    p.add_argument("--seconds", type=float, help="seconds per measurement (default 6 with --quick, else 20)")
    p.add_argument("--json", help="write utts_per_s_flac / utts_per_s_features (local) and per-source numbers here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    seconds = args.seconds or (6.0 if args.quick else 20.0)
    wanted = args.sources.split(",")
    runs: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    ratios: dict[str, list[float]] = collections.defaultdict(list)  # per side-by-side run: local / seek per CPU-s
    mean_audio = {}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = args.corpus
        if corpus is None:
            t = time.perf_counter()
            corpus = _build(os.path.join(tmp, "bench"), 300 if args.quick else 1500)
            print(f"built benchmark corpus in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        costs = reader_costs(corpus) if "seek" in wanted and "local" in wanted else {}
        with sources(os.path.abspath(corpus), [w for w in wanted if w in ("http", "s3")]) as where:
            where = {"seek": where["local"], **where}
            paired = "seek" in wanted and "local" in wanted
            # seek and local side by side (measure_pair), `repeat` times per feature kind; other sources once each
            kinds = [kind == "features" for kind in ("flac", "features") if kind in args.kinds.split(",")]
            plan = [("pair", pre) for _ in range(args.repeat) for pre in kinds] if paired else []
            plan += [(name, pre) for name in where if name in wanted and not (paired and name in ("seek", "local"))
                     for pre in kinds]
            for name, pre in plan:
                kind = "features" if pre else "flac"
                if name == "pair":
                    res = measure_pair(where["local"], pre, seconds, args.spec_augment)
                    ratios[f"utts_per_cpu_s_{kind}"].append(res.pop("ratio"))
                else:
                    res = {name: measure(where[name], pre, seconds, args.spec_augment, seek=name == "seek")}
                for n, r in res.items():
                    runs[n][f"utts_per_s_{kind}"].append(r["utts_per_s"])
                    runs[n][f"utts_per_cpu_s_{kind}"].append(r["utts_per_cpu_s"])
                    mean_audio.setdefault(n, r["mean_seconds_audio"])
                    print(f"  {n:6s} {'stored fbank' if pre else 'FLAC + fbank':12s} {r['utts_per_s']:9.1f} utt/s "
                          f"{r['utts_per_cpu_s']:9.1f} utt/CPU-s", file=sys.stderr)
    table = {name: {k: round(statistics.median(v), 1) for k, v in r.items()} | {"runs": {k: [round(x, 1) for x in v]
                                                                               for k, v in r.items()}}
             for name, r in runs.items()}
    ratio = {k: round(statistics.median(v), 3) for k, v in ratios.items()}
    first = table.get("local") or next(iter(table.values()))
    res = {"utts_per_s_flac": first.get("utts_per_s_flac"), "utts_per_s_features": first.get("utts_per_s_features"),
           "mean_seconds_audio": round(next(iter(mean_audio.values())), 2), "spec_augment": args.spec_augment,
           "sources": table, "local_over_seek_per_cpu_s": ratio,
           "local_over_seek_runs": {k: [round(x, 3) for x in v] for k, v in ratios.items()},
           "reader_us_per_sample": costs,
           "load_average": os.getloadavg(),
           "targets": {"utts_per_s_flac": 300, "utts_per_s_features": 2000}}
    print(f"{'':10s} {'(a) FLAC + fbank':>21s} {'(b) stored fbank':>21s}   per worker, median of runs")
    print(f"{'source':10s} {'utt/s':>10s} {'utt/CPU-s':>10s} {'utt/s':>10s} {'utt/CPU-s':>10s}   (targets 300 / 2000)")
    cols = ("utts_per_s_flac", "utts_per_cpu_s_flac", "utts_per_s_features", "utts_per_cpu_s_features")
    for name, r in table.items():
        print(f"{name:10s} " + " ".join(f"{r[c]:10.1f}" if c in r else f"{'-':>10s}" for c in cols))
    for c, name in (("utts_per_cpu_s_flac", "FLAC + fbank"), ("utts_per_cpu_s_features", "stored fbank")):
        if c in ratio:
            print(f"local / seek per CPU-second, side by side, {name}: median {ratio[c]:.3f} of runs "
                  + " ".join(f"{x:.3f}" for x in ratios[c]))
    for name, c in costs.items():
        print(f"reader only, {name:5s}: {c['first_pass_us']:7.1f} us/sample first pass, {c['reread_us']:6.1f} "
              "re-reading (CPU; stored-feature members, no decoding)")
    print(f"mean utterance {res['mean_seconds_audio']} s; load average {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
