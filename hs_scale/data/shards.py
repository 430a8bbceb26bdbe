"""Reading WebDataset tar shards by member offset, and decoding samples.

The shards are ordinary WebDataset tars (``<key>.flac``, ``<key>.fbank.npy``, ``<key>.txt``,
``<key>.translation.txt``, ``<key>.json``), readable by `webdataset.WebDataset`. The loader does not stream them
through webdataset because webdataset has no mid-epoch resume: instead each shard's member offsets are indexed
once (a scan of the 512-byte tar headers, no data read) and samples are read with seek + read. Reads stay
near-sequential because the sampling plan walks each shard in order within a shuffle window.
"""

from __future__ import annotations

import collections
import io
import json
import os
import tarfile

import numpy as np

# Member extensions (everything after the first "." of the member name, as webdataset does).
AUDIO, FBANK, TEXT, TRANSLATION, META = "flac", "fbank.npy", "txt", "translation.txt", "json"


class SampleError(Exception):
    """A bad sample. `kind` is one of the loader's error-count keys."""

    def __init__(self, kind: str, key: str, shard: str, msg: str):
        super().__init__(f"{kind}: sample {key!r} in shard {shard}: {msg}")
        self.kind, self.key, self.shard = kind, key, shard


def index_tar(path: str) -> tuple[dict[str, dict[str, tuple[int, int]]], str | None]:
    """{key: {ext: (data_offset, size)}} for one tar, plus an error message if the tar is damaged.

    Members whose data runs past the end of the file (a truncated tar) are left out, so reading them reports
    them as truncated. A file that is not a tar at all yields ({}, message).
    """
    index: dict[str, dict[str, tuple[int, int]]] = collections.defaultdict(dict)
    err = None
    try:
        file_size = os.path.getsize(path)
        with tarfile.open(path, mode="r:") as tf:
            try:
                for m in tf:
                    if not m.isfile():
                        continue
                    base = os.path.basename(m.name)
                    if "." not in base:
                        continue
                    key, ext = base.split(".", 1)
                    if m.offset_data + m.size > file_size:
                        err = f"member {m.name} is truncated ({file_size - m.offset_data} of {m.size} bytes)"
                        continue
                    index[key][ext] = (m.offset_data, m.size)
            except (tarfile.TarError, OSError, EOFError) as exc:  # damaged header mid-file: keep what came before
                err = f"damaged tar after {len(index)} samples: {exc}"
    except (tarfile.TarError, OSError, EOFError) as exc:
        return {}, f"cannot open tar: {exc}"
    return dict(index), err


class ShardReader:
    """Random access to samples of many shards. Keeps a few file handles open (LRU) and the indexes cached."""

    def __init__(self, root: str, max_open: int = 8):
        self.root = root
        self.max_open = max_open
        self._index: dict[str, dict] = {}
        self._index_err: dict[str, str | None] = {}
        self._fh: collections.OrderedDict[str, io.BufferedReader] = collections.OrderedDict()

    def path(self, shard: str) -> str:
        return shard if os.path.isabs(shard) else os.path.join(self.root, shard)

    def index(self, shard: str) -> dict:
        if shard not in self._index:
            self._index[shard], self._index_err[shard] = index_tar(self.path(shard))
        return self._index[shard]

    def shard_error(self, shard: str) -> str | None:
        self.index(shard)
        return self._index_err[shard]

    def _handle(self, shard: str):
        fh = self._fh.pop(shard, None)
        if fh is None:
            fh = open(self.path(shard), "rb")
            if len(self._fh) >= self.max_open:
                self._fh.popitem(last=False)[1].close()
        self._fh[shard] = fh
        return fh

    def read(self, shard: str, key: str, exts: tuple[str, ...]) -> dict[str, bytes]:
        """Raw member bytes for `exts` of one sample. Raises SampleError('truncated', ...) if any is missing."""
        members = self.index(shard).get(key)
        if members is None:
            why = self._index_err.get(shard) or "not in shard"
            raise SampleError("truncated", key, shard, f"sample missing ({why})")
        out = {}
        fh = self._handle(shard)
        for ext in exts:
            if ext not in members:
                if ext in (TRANSLATION,):
                    continue
                raise SampleError("truncated", key, shard, f"member .{ext} missing")
            off, size = members[ext]
            fh.seek(off)
            data = fh.read(size)
            if len(data) != size:
                raise SampleError("truncated", key, shard, f"member .{ext}: read {len(data)} of {size} bytes")
            out[ext] = data
        return out

    def close(self) -> None:
        for fh in self._fh.values():
            fh.close()
        self._fh.clear()


def decode_audio(data: bytes, key: str, shard: str) -> np.ndarray:
    """FLAC bytes -> float32 [N] at 16 kHz."""
    import soundfile as sf

    try:
        wav, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError / TypeError on garbage
        raise SampleError("bad_audio", key, shard, f"undecodable audio: {exc}") from None
    if sr != 16_000:
        raise SampleError("bad_audio", key, shard, f"sample rate {sr}, expected 16000")
    if wav.ndim != 1 or len(wav) == 0:
        raise SampleError("bad_audio", key, shard, f"audio shape {wav.shape}, expected mono [N>0]")
    return wav


def decode_fbank(data: bytes, key: str, shard: str) -> np.ndarray:
    """.npy bytes (float16 [T, 80]) -> float32 [T, 80]."""
    try:
        x = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise SampleError("bad_audio", key, shard, f"undecodable features: {exc}") from None
    if x.ndim != 2 or x.shape[1] != 80:
        raise SampleError("bad_audio", key, shard, f"feature shape {x.shape}, expected [T, 80]")
    return x.astype(np.float32)


def decode_text(data: bytes | None, key: str, shard: str) -> str:
    if data is None:
        return ""
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise SampleError("bad_text", key, shard, f"text is not UTF-8: {exc}") from None


def decode_meta(data: bytes) -> dict:
    return json.loads(data.decode("utf-8"))
