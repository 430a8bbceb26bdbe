"""Streaming WebDataset tar shards sequentially (no seeks), checking members, and decoding samples.

The shards are ordinary WebDataset tars (``<key>.flac``, ``<key>.fbank.npy``, ``<key>.txt``,
``<key>.translation.txt``, ``<key>.json``; tests read them with `webdataset.WebDataset`). They are read front to
back (`iter_samples`) from any location `hs_scale.data.urls` opens (local, pipe:, http(s), s3), so a remote
shard is one sequential GET. Random access is replaced by a cursor per open shard (`ShardStream`):
the samples of a shard are requested in near-sequential order (see plan.py), samples passed over that this
reader still wants are kept in a small buffer, and a request for a sample already passed re-opens the shard
and skips members sequentially. The bytes returned never depend on the cursor's history, which is what makes
resume exact: a resumed reader re-opens its shards and skips the consumed samples.

Stream failures (dropped connection, 404, truncated body, damaged tar) are retried `retries` times from the
last complete sample (re-open + skip); after that the shard's unread samples fail as SampleError ("io_error"
for transport failures, "truncated" for a damaged or short tar), which the loader skips or raises by policy.
Every read has a timeout, so nothing waits forever.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import time
import zlib

import numpy as np

from hs_scale.data import urls

log = logging.getLogger(__name__)

# Member extensions (everything after the first "." of the member name, as webdataset does).
AUDIO, FBANK, TEXT, TRANSLATION, META = "flac", "fbank.npy", "txt", "translation.txt", "json"


class SampleError(Exception):
    """A bad sample. `kind` is one of the loader's error-count keys."""

    def __init__(self, kind: str, key: str, shard: str, msg: str):
        super().__init__(f"{kind}: sample {key!r} in shard {shard}: {msg}")
        self.kind, self.key, self.shard = kind, key, shard


def member_crcs(members: dict[str, bytes]) -> str:
    """Per-member CRC-32 (zlib; ~GB/s, enough to catch flipped bytes and swapped text, not an attacker) as
    ``"ext=xxxxxxxx ..."`` in sorted ext order: the manifest's ``crc32`` column."""
    return " ".join(f"{ext}={zlib.crc32(members[ext]):08x}" for ext in sorted(members))


def check_crcs(members: dict[str, bytes], expected: str, key: str, shard: str) -> None:
    """Raise SampleError("checksum") if a member in `members` differs from the manifest's ``crc32`` entry.
    Members not listed there (old corpora: empty `expected`) are not checked."""
    if not expected:
        return
    for item in expected.split():
        ext, _, crc = item.partition("=")
        if ext in members and f"{zlib.crc32(members[ext]):08x}" != crc:
            raise SampleError("checksum", key, shard, f"member .{ext} does not match the manifest's CRC-32 "
                              "(changed or corrupted after the corpus was built)")


class TarFormatError(Exception):
    """The stream is not a (complete) tar: bad header checksum, or it ends inside a member."""


def _read_exact(fh, n: int) -> bytes:
    data = fh.read(n)
    while len(data) < n:  # pipes and sockets may return short reads before the end
        more = fh.read(n - len(data))
        if not more:
            raise TarFormatError(f"unexpected end of data ({len(data)} of {n} bytes)")
        data += more
    return data


def _octal(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    field = field.split(b"\0", 1)[0].strip()
    try:
        return int(field, 8) if field else 0
    except ValueError:
        raise TarFormatError(f"bad tar header field {field[:12]!r} (not a tar, or damaged)") from None


def _skip(fh, n: int) -> None:
    """Advance n bytes: a forward seek on a local file (still sequential), read-and-discard on a stream."""
    if getattr(fh, "seekable", lambda: False)():  # webdataset's Pipe has no seekable()
        fh.seek(n, 1)
        return
    while n > 0:
        n -= len(_read_exact(fh, min(n, 1 << 20)))


def iter_members(fh, keep=None):
    """(name, bytes) of the regular files of a tar stream, front to back, with no seeks (backwards).
    keep(name) -> False skips a member's data (its name is still yielded, with b"" as data).

    Hand-written rather than `tarfile` in stream mode: tarfile spends ~40 us of Python per member (5 members per
    sample), which alone halved the stored-features throughput; this reads the same formats (ustar, GNU long
    names, pax path/size records, base-256 sizes) at a few us per member. Header checksums are verified.
    """
    long_name = None
    pax: dict[str, str] = {}
    while True:
        head = fh.read(512)
        if len(head) < 512:
            if not head:  # end of stream without the end-of-archive blocks: accepted, as tarfile does
                return
            head += _read_exact(fh, 512 - len(head))
        if head == bytes(512):
            return
        if _octal(head[148:156]) != sum(head) - sum(head[148:156]) + 256:  # checksum field counts as spaces
            raise TarFormatError("bad tar header checksum (not a tar, or damaged)")
        size = _octal(head[124:136])
        kind = head[156:157]
        name = head[:100].split(b"\0", 1)[0]
        if head[257:262] == b"ustar" and head[345:500].strip(b"\0"):
            name = head[345:500].split(b"\0", 1)[0] + b"/" + name
        if "size" in pax:
            size = int(pax["size"])
        padded = size + (-size % 512)
        if keep is not None and kind in (b"0", b"\0", b"7") and not long_name and not pax:
            path = name.decode("utf-8", "surrogateescape")
            if not keep(path):
                _skip(fh, padded)
                yield path, b""
                continue
        data = _read_exact(fh, padded)  # one read for the data and its padding
        if padded > size:
            data = data[:size]
        if kind == b"L":  # GNU long name for the next member
            long_name = data.split(b"\0", 1)[0]
            continue
        if kind in (b"x", b"g"):  # pax extended header (x: next member; g: global, ignored)
            if kind == b"x":
                pax = _pax_records(data)
            continue
        path = pax.get("path") or (long_name or name).decode("utf-8", "surrogateescape")
        long_name, pax = None, {}
        if kind in (b"0", b"\0", b"7"):
            yield path, data


def _pax_records(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        length = int(data[pos:data.index(b" ", pos)])
        key, _, value = data[data.index(b" ", pos) + 1:pos + length - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def iter_samples(fileobj, url: str, exts: set[str] | None = None):
    """Samples of one tar stream as (key, {ext: bytes}), in tar order, reading front to back. `exts`: only
    these members are read (the others are skipped over and left out).

    Grouping follows webdataset (key = member basename up to its first ".", consecutive members with one key
    form a sample). Not webdataset's `tar_file_iterator` + `group_by_keys`: those yield a sample only after the
    *next* member's data has been read, so a stream that breaks inside a sample would also lose the complete
    sample before it, and a retry could not tell where it stopped.
    """
    key, members = None, {}
    keep = None if exts is None else (lambda name: name.split("/")[-1].split(".", 1)[-1].lower() in exts)
    try:
        for name, data in iter_members(fileobj, keep):
            base = os.path.basename(name)
            if "." not in base:
                continue
            k, ext = base.split(".", 1)
            if k != key:
                if key is not None:
                    yield key, members
                key, members = k, {}
            if ext in members:
                raise TarFormatError(f"{url}: member {name} appears twice")
            if exts is None or ext.lower() in exts:
                members[ext.lower()] = data
    except Exception as exc:
        # The sample being read when the stream broke may be complete (the break came before the next sample's
        # header) or not; it is handed to the caller on the exception, to use once retries are exhausted.
        exc.pending = (key, members) if key is not None else None
        raise
    if key is not None:
        yield key, members


# Errors of the tar format itself (a damaged or short tar); anything else while reading is a transport error.
_TAR_ERRORS = (TarFormatError, ValueError)


class ShardStream:
    """Sequential cursor over one shard. `get(key)` returns the sample's members; `wanted` are the keys this
    reader will ask for (passed-over wanted samples are buffered, everything else is dropped)."""

    def __init__(self, url: str, shard: str, wanted: set[str], retries: int = 3, timeout: float = 30.0,
                 exts: set[str] | None = None):
        self.url, self.shard, self.wanted, self.exts = url, shard, wanted, exts
        self.retries, self.timeout = retries, timeout
        self.buffer: dict[str, dict[str, bytes]] = {}
        self.passed: set[str] = set()   # keys passed in this pass (a request for one re-opens the shard)
        self.reached: set[str] = set()  # keys passed in any pass (after a failure, the others fail at once)
        self.failure: SampleError | None = None
        self._fh = self._it = None
        self.count = 0                  # samples passed in the current pass
        self.eof = False
        self.opens = 0                  # for tests and the benchmark: how often the shard was (re)opened

    def _open(self) -> None:
        self._fh = urls.open_url(self.url, self.timeout)
        self.opens += 1
        self._it = iter_samples(self._fh, self.url, self.exts)
        for _ in range(self.count):  # resume after a failure: skip what this pass already passed
            next(self._it)

    def _close(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()
            except Exception:  # closing a broken connection may raise again; it is being dropped anyway
                pass
        self._fh = self._it = None

    def _next(self):
        """The next (key, members) of this pass, or None at the end (or after retries ran out)."""
        for attempt in range(self.retries + 1):
            try:
                if self._it is None:
                    self._open()
                item = next(self._it, None)
                if item is None:
                    self.eof = True
                    self._close()
                else:
                    self.count += 1
                return item
            except Exception as exc:  # any failure of open/read: retried from the last complete sample
                self._close()
                pending = getattr(exc, "pending", None)
                kind = "truncated" if isinstance(exc, _TAR_ERRORS) else "io_error"
                if isinstance(exc, FileNotFoundError):
                    kind = "io_error"
                msg = f"{type(exc).__name__}: {exc} (reading {self.url}, after {self.count} samples)"
                if attempt < self.retries:
                    log.info("retrying shard %s (%d/%d): %s", self.shard, attempt + 1, self.retries, msg)
                    if urls.is_remote(self.url) or self.url.startswith("pipe:"):
                        time.sleep(min(2.0, 0.1 * 2**attempt))
                    continue
                self.failure = SampleError(kind, "", self.shard, f"{msg}; gave up after {self.retries} retries")
                self.eof = True
                if pending is not None and kind == "truncated":
                    # A tar that ends there: what there is of its last sample (missing members fail later).
                    # After a transport failure the sample is not trusted: it fails with the stream.
                    self.count += 1
                    return pending
                return None
        raise AssertionError("unreachable")

    def _restart(self) -> None:
        self._close()
        self.count, self.eof = 0, False
        self.passed.clear()

    def get(self, key: str) -> dict[str, bytes]:
        if key in self.buffer:
            return self.buffer.pop(key)
        if self.failure is not None and key not in self.reached:
            raise SampleError(self.failure.kind, key, self.shard, str(self.failure).split(": ", 2)[-1])
        if key in self.passed or self.eof:
            self._restart()
        while not self.eof:
            item = self._next()
            if item is None:
                break
            k, members = item
            self.passed.add(k)
            self.reached.add(k)
            if k == key:
                return members
            if k in self.wanted:
                self.buffer[k] = members
        if self.failure is not None:
            raise SampleError(self.failure.kind, key, self.shard, str(self.failure).split(": ", 2)[-1])
        raise SampleError("truncated", key, self.shard, "sample not in the shard")

    def close(self) -> None:
        self._close()
        self.buffer.clear()


class StreamReader:
    """The shards of one reader (DataLoader worker): a ShardStream per shard, at most `max_open` at once (LRU;
    a closed one is simply re-opened and skipped forward when needed again)."""

    def __init__(self, corpus: str, wanted: dict[str, set[str]], retries: int = 3, timeout: float = 30.0,
                 max_open: int = 64, exts: set[str] | None = None):
        self.corpus, self.wanted, self.retries, self.timeout, self.max_open = corpus, wanted, retries, timeout, max_open
        self.exts = exts
        self._streams: collections.OrderedDict[str, ShardStream] = collections.OrderedDict()
        self.opens = 0

    def stream(self, shard: str) -> ShardStream:
        st = self._streams.pop(shard, None)
        if st is None:
            st = ShardStream(urls.join(self.corpus, shard), shard, self.wanted.get(shard, set()), self.retries,
                             self.timeout, self.exts)
            if len(self._streams) >= self.max_open:
                old = self._streams.popitem(last=False)[1]
                self.opens += old.opens
                old.close()
        self._streams[shard] = st
        return st

    def get(self, shard: str, key: str) -> dict[str, bytes]:
        return self.stream(shard).get(key)

    def total_opens(self) -> int:
        return self.opens + sum(s.opens for s in self._streams.values())

    def close(self) -> None:
        for st in self._streams.values():
            self.opens += st.opens
            st.close()
        self._streams.clear()


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
