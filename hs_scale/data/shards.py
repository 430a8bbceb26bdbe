"""Streaming WebDataset tar shards sequentially (no seeks), checking members, and decoding samples.

The shards are ordinary WebDataset tars (``<key>.flac``, ``<key>.fbank.npy``, ``<key>.txt``,
``<key>.translation.txt``, ``<key>.json``; tests read them with `webdataset.WebDataset`). They are read front to
back (`iter_samples`) from any location `hs_scale.data.urls` opens (local, pipe:, http(s), s3), so a remote
shard is one sequential GET. Random access is replaced by a cursor per open shard (`ShardStream`):
the samples of a shard are requested in near-sequential order (see plan.py), samples passed over that this
reader still wants are kept in a small buffer, and a request for a sample already passed re-opens the shard
and skips members sequentially (a local shard replays the member offsets it recorded while parsing, so a
re-read costs no header parsing; forward seeks only). The bytes returned never depend on the cursor's history,
which is what makes resume exact: a resumed reader re-opens its shards and skips the consumed samples.

Stream failures (dropped connection, 404, truncated body, damaged tar) are retried `retries` times from the
last complete sample (re-open + skip); after that the shard's unread samples fail as SampleError ("io_error"
for transport failures, "truncated" for a damaged or short tar), which the loader skips or raises by policy.
Every read has a timeout, so nothing waits forever.
"""

from __future__ import annotations

import collections
import io
import itertools
import json
import logging
import mmap
import os
import re
import struct
import time
import zlib

import numpy as np
import torch

from hs_scale.data import urls

log = logging.getLogger(__name__)

# Member extensions (everything after the first "." of the member name, as webdataset does).
AUDIO, FBANK, TEXT, TRANSLATION, META = "flac", "fbank.npy", "txt", "translation.txt", "json"


class SampleError(Exception):
    """A bad sample. `kind` is one of the loader's error-count keys."""

    def __init__(self, kind: str, key: str, shard: str, msg: str):
        super().__init__(f"{kind}: sample {key!r} in shard {shard}: {msg}")
        self.kind, self.key, self.shard = kind, key, shard


try:  # ISA-L's CRC-32 (the `isal` wheel): the same values as zlib.crc32, ~8x faster on x86 (0.5 vs 4 us per
    # 28 KB feature member); the check runs on every sample read, so this is worth an optional import.
    from isal.isal_zlib import crc32 as _crc32
except ImportError:
    from zlib import crc32 as _crc32


def member_crcs(members: dict[str, bytes]) -> str:
    """Per-member CRC-32 (zlib's; ~GB/s, enough to catch flipped bytes and swapped text, not an attacker) as
    ``"ext=xxxxxxxx ..."`` in sorted ext order: the manifest's ``crc32`` column."""
    return " ".join(f"{ext}={_crc32(members[ext]):08x}" for ext in sorted(members))


def check_crcs(members: dict[str, bytes | memoryview], expected: str, key: str, shard: str) -> None:
    """Raise SampleError("checksum") if a member in `members` differs from the manifest's ``crc32`` entry.
    Members not listed there (old corpora: empty `expected`) are not checked."""
    if not expected:
        return
    listed = f" {expected} "  # two substring tests per member: cheaper than parsing the entry (every read)
    for ext, data in members.items():
        if f" {ext}={_crc32(data):08x} " not in listed and f" {ext}=" in listed:
            raise SampleError("checksum", key, shard, f"member .{ext} does not match the manifest's CRC-32 "
                              "(changed or corrupted after the corpus was built)")


class TarFormatError(Exception):
    """The stream is not a (complete) tar: bad header checksum, or it ends inside a member."""


def _read_exact(read, n: int) -> bytes:
    """n bytes from read(n) (a file's read method), which may return short reads before the end."""
    data = read(n)
    while len(data) < n:  # pipes and sockets may return short reads before the end
        more = read(n - len(data))
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


# Read-ahead of the tar reader. Headers and small members are sliced out of it; a skipped member that extends past
# it is passed with a forward seek (seekable files) so its bytes are never read, which is what keeps sequential
# reading of stored features (skipping the FLAC) as cheap as the old seek reader.
_CHUNK = 1 << 15
_ZERO_BLOCK = bytes(512)
_REGULAR = (0x30, 0x00, 0x37)  # type flags "0", NUL, "7": regular files
# name (offset 0), size (124), checksum (148), type flag (156) of a tar header, unpacked in one call
_HEADER = struct.Struct("100s24x12s12x8sB")


def _refill(read, buf: bytes, pos: int, need: int) -> bytes:
    """The unread bytes buf[pos:] followed by newly read ones, at least `need` of them unless the stream ends."""
    rest = buf[pos:]
    while len(rest) < need:
        more = read(max(_CHUNK, need - len(rest)))
        if not more:
            break
        rest += more
    return rest


def _entries(fh, exts: set[str] | None, start: int = 0):
    """(name, key, ext, data, offset, entry) of each regular file of a tar stream, front to back, never seeking
    backwards. name: the member's path (bytes); key/ext: its basename split at the first "." (key bytes, ext a
    lower-cased str, "" without a "."); data is None for a member whose ext is not in `exts` (its bytes are
    skipped); offset: where its data starts in the stream, entry: where its first header (a GNU long name or pax
    header, if any) starts, counted from `start`, the stream offset of fh's current position.

    Hand-written rather than `tarfile` in stream mode: tarfile spends ~40 us of Python per member (5 members per
    sample), which alone halved the stored-features throughput. This reads the same formats (ustar, GNU long
    names, pax path/size records, base-256 sizes) and verifies every header checksum, with a handful of C calls
    per member: one struct unpack for the fields, and the checksum from zlib.adler32, whose low 16 bits are
    1 + (sum of the bytes) mod 65521: a 256-byte half sums to at most 65,280 < 65,521, so two halves give the
    exact byte sum (5x faster than sum()).
    """
    read = fh.read
    seekable = getattr(fh, "seekable", None)  # webdataset's Pipe has no seekable()
    seek = fh.seek if seekable is not None and seekable() else None
    unpack, adler32 = _HEADER.unpack_from, zlib.adler32
    ext_str: dict[bytes, str] = {}
    buf, pos, mv = b"", 0, memoryview(b"")
    base = start  # stream offset of buf[0]
    entry = start
    long_name, pax = None, None
    while True:
        if len(buf) - pos < 512:
            base += pos
            buf, pos = _refill(read, buf, pos, 512), 0
            mv = memoryview(buf)
            if len(buf) < 512:
                if not buf:  # end of stream without the end-of-archive blocks: accepted, as tarfile does
                    return
                raise TarFormatError(f"unexpected end of data ({len(buf)} of 512 header bytes)")
        name, size_field, chk, kind = unpack(buf, pos)
        if not name[0] and buf[pos:pos + 512] == _ZERO_BLOCK:
            return
        try:  # fast path of _octal (which handles base-256 sizes, blank fields and errors)
            stored, size = int(chk.partition(b"\0")[0], 8), int(size_field.partition(b"\0")[0], 8)
        except ValueError:
            stored, size = _octal(chk), _octal(size_field)
        total = (adler32(mv[pos:pos + 256]) & 0xFFFF) + (adler32(mv[pos + 256:pos + 512]) & 0xFFFF) - 2
        if stored != total - sum(chk) + 256:  # the checksum field itself counts as 8 spaces
            raise TarFormatError("bad tar header checksum (not a tar, or damaged)")
        if long_name is None and pax is None:
            entry = base + pos
        head, pos = pos, pos + 512
        if pax is not None and "size" in pax:
            size = int(pax["size"])
        n = size + (-size % 512)  # data and its padding
        if kind in _REGULAR and long_name is None and pax is None:  # a plain member: the common case
            name = name.partition(b"\0")[0]
            if buf[head + 345] and buf[head + 257:head + 262] == b"ustar":  # ustar prefix: the directory part
                name = buf[head + 345:head + 500].partition(b"\0")[0] + b"/" + name
        else:
            offset = base + pos
            data, buf, pos = _take(read, buf, pos, size, n)
            if not buf:
                base, mv = offset + n, memoryview(buf)
            if kind == 0x4C:  # "L": GNU long name for the next member
                long_name = data.partition(b"\0")[0]
                continue
            if kind in (0x78, 0x67):  # "x" pax header for the next member; "g" global, ignored
                if kind == 0x78:
                    pax = _pax_records(data)
                continue
            path = (pax or {}).get("path")
            name = path.encode("utf-8", "surrogateescape") if path else long_name or name.partition(b"\0")[0]
            long_name = pax = None
            if kind in _REGULAR:  # its data is read already
                key, _, ext = name.rpartition(b"/")[2].partition(b".")
                ext = ext.decode("utf-8", "surrogateescape").lower()
                yield name, key, ext, data if exts is None or ext in exts else None, offset, entry
            continue
        key, _, ext_b = name.rpartition(b"/")[2].partition(b".")
        ext = ext_str.get(ext_b)
        if ext is None:
            ext = ext_str[ext_b] = ext_b.decode("utf-8", "surrogateescape").lower()
        if exts is not None and ext not in exts:
            offset = base + pos
            if pos + n <= len(buf):
                pos += n
            else:  # it goes past the read-ahead: seek over the rest (or read and drop it)
                rest, buf, pos, base, mv = n - (len(buf) - pos), b"", 0, offset + n, memoryview(b"")
                if seek is not None:
                    seek(rest, 1)
                else:
                    while rest > 0:
                        rest -= len(_read_exact(read, min(rest, 1 << 20)))
            yield name, key, ext, None, offset, entry
            continue
        offset = base + pos
        if pos + n <= len(buf):
            data = buf[pos:pos + size]
            pos += n
        else:
            data, buf, pos = _take(read, buf, pos, size, n)
            base, mv = offset + n, memoryview(buf)
        yield name, key, ext, data, offset, entry


def _take(read, buf: bytes, pos: int, size: int, n: int) -> tuple[bytes, bytes, int]:
    """(data, buf, pos): `size` bytes from buf[pos:] then the stream, the cursor advanced by n >= size bytes."""
    if pos + n <= len(buf):
        return buf[pos:pos + size], buf, pos + n
    have = buf[pos:]
    if len(have) >= size:
        data = have[:size]
    else:
        data = have + _read_exact(read, size - len(have))
    pad = n - max(size, len(have))
    if pad:
        _read_exact(read, pad)
    return data, b"", 0


def iter_members(fh, exts: set[str] | None = None):
    """(name, bytes) of the regular files of a tar stream, front to back, with no seeks (backwards). Members whose
    extension (after the basename's first ".", lower-cased) is not in `exts` are skipped: b"" as their data."""
    for name, _, _, data, _, _ in _entries(fh, exts):
        yield name.decode("utf-8", "surrogateescape"), b"" if data is None else data


def _pax_records(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        length = int(data[pos:data.index(b" ", pos)])
        key, _, value = data[data.index(b" ", pos) + 1:pos + length - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def iter_samples(fileobj, url: str, exts: set[str] | None = None, layout: list | None = None, start: int = 0):
    """Samples of one tar stream as (key, {ext: bytes}), in tar order, reading front to back. `exts`: only
    these members are read (the others are skipped over and left out). `layout`: a list to which
    (key, {ext: (offset, size)}, end) is appended for every sample yielded, end being where the next sample starts
    (None for the last one); offsets count from `start`, the stream offset of fileobj's position (for `_runs`).

    Grouping follows webdataset (key = member basename up to its first ".", consecutive members with one key
    form a sample). Not webdataset's `tar_file_iterator` + `group_by_keys`: those yield a sample only after the
    *next* member's data has been read, so a stream that breaks inside a sample would also lose the complete
    sample before it, and a retry could not tell where it stopped.
    """
    key, members, current, spans = None, {}, None, {}
    try:
        for name, k, ext, data, offset, entry in _entries(fileobj, exts, start):
            if not ext:
                continue
            if k != current:
                if key is not None:
                    if layout is not None:
                        layout.append((key, spans, entry))
                    yield key, members
                key, members, current, spans = k.decode("utf-8", "surrogateescape"), {}, k, {}
            if ext in members:
                raise TarFormatError(f"{url}: member {name.decode('utf-8', 'replace')} appears twice")
            if data is not None:
                members[ext] = data
                spans[ext] = (offset, len(data))
    except Exception as exc:
        # The sample being read when the stream broke may be complete (the break came before the next sample's
        # header) or not; it is handed to the caller on the exception, to use once retries are exhausted.
        exc.pending = (key, members) if key is not None else None
        raise
    if key is not None:
        if layout is not None:
            layout.append((key, spans, None))
        yield key, members


# Small kept members of one sample closer than _MERGE_GAP are sliced out of the map together (the bytes between
# are dropped); a member of _SMALL bytes or more is sliced alone (slicing it out of a larger slice would copy it
# twice), and a .npy array is handed out as a memoryview of the map (no copy at all).
_MERGE_GAP = 1 << 12
_SMALL = 1 << 14


def _runs(spans: dict[str, tuple[int, int]]) -> tuple:
    """A sample's kept members {ext: (offset, size)} -> reads ((offset, length, ((ext, start, stop), ...), view), ...):
    small members at most _MERGE_GAP apart share one read, each sliced out of it by [start:stop]; view: the read is
    one .npy member, handed out as a view of the map."""
    runs: list[list] = []
    for ext, (off, size) in sorted(spans.items(), key=lambda item: item[1][0]):
        view = ext.endswith("npy")
        if (runs and not view and not runs[-1][3] and size < _SMALL and runs[-1][1] < _SMALL
                and off - (runs[-1][0] + runs[-1][1]) <= _MERGE_GAP):
            run = runs[-1]
            run[2].append((ext, off - run[0], off - run[0] + size))
            run[1] = off + size - run[0]
        else:
            runs.append([off, size, [(ext, 0, size)], view])
    return tuple((off, n, tuple(parts), view) for off, n, parts, view in runs)


def _replay(mm: mmap.mmap, layout: list, start: int, held=()):
    """Samples start, start + 1, ... of a local shard, mapped (privately) as `mm`, from the layout an earlier pass
    recorded (`ShardStream._local_samples`: (key, reads, end) per sample, reads from `_runs`): no header parsing,
    no system calls. Same bytes as iter_samples gives on the unchanged file (the caller checks that it is
    unchanged: size, mtime), except that samples whose key is in `held` (the caller holds them already) come as
    (key, None), unread. Features (.npy) come as writable memoryviews of the private map, which decode_fbank reads
    in place (as do CRC-32 and np.load); other members as bytes copied out of the map: soundfile would copy a view
    into a BytesIO anyway (a bytes object it shares), and that copy, made at decode time, measured ~8 us per
    1.5 s FLAC slower than this one.

    Why a map: a stored-features sample costs ~60 us through the loader, and reading its ~25 KB of features into a
    fresh bytes object cost 4-17 us of it (the syscalls, and page faults on the newly allocated memory of every
    pool); the view costs nothing."""
    view = memoryview(mm)
    for key, reads, _ in itertools.islice(layout, start, None):
        if key in held:
            yield key, None
            continue
        members = {}
        for offset, length, parts, as_view in reads:
            if offset + length > len(mm):
                raise TarFormatError(f"unexpected end of data (member at {offset}+{length} of a {len(mm)}-byte "
                                     "file; changed since read)")
            if as_view:
                members[parts[0][0]] = view[offset:offset + length]
            elif len(parts) == 1:
                members[parts[0][0]] = mm[offset:offset + length]
            else:
                data = mm[offset:offset + length]
                for ext, lo, hi in parts:
                    members[ext] = data[lo:hi]
        yield key, members


# Errors of the tar format itself (a damaged or short tar); anything else while reading is a transport error.
_TAR_ERRORS = (TarFormatError, ValueError)


class ShardStream:
    """Sequential cursor over one shard. `get(key)` returns the sample's members; `wanted` are the keys this
    reader will ask for (passed-over wanted samples are buffered, everything else is dropped).

    A local shard records where the kept members of the samples it has parsed lie; a later pass over the unchanged
    file (same size and mtime) replays that prefix from a private memory map of the file (`_replay`: no header
    parsing, no copy of stored features) and parses on from where it ends. This makes re-reading a shard (each
    epoch, and small streams that temperature sampling cycles) cheaper than the old seek reader; the bytes are the
    same either way, and the loader checks their CRC-32 on every read. Remote shards are always parsed (one
    sequential GET per pass).

    NOTE: like any memory-mapped reader (numpy.memmap, Arrow, safetensors), a worker replaying a local shard
    that is truncated in place at that moment dies with SIGBUS (the DataLoader reports the killed worker) rather
    than counting `truncated`; a shard changed or replaced (rename) between passes is detected and parsed again.
    """

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
        self.replays = 0                # opens that replayed a recorded prefix
        self._local = urls.local_path(url) is not None
        self._layout: list = []         # local: (key, reads, end) of the first samples of the file with _stat
        self._complete = False          # the layout covers the whole file
        self._stat: tuple[int, int] | None = None
        self._mm: mmap.mmap | None = None  # local: the file with _stat, mapped once its layout is used

    def _open(self) -> None:
        self._fh = urls.open_url(self.url, self.timeout)
        self.opens += 1
        if not self._local:
            self._it = iter_samples(self._fh, self.url, self.exts)
            for _ in range(self.count):  # resume after a failure: skip what this pass already passed
                next(self._it)
            return
        st = os.fstat(self._fh.fileno())
        if self._stat != (st.st_size, st.st_mtime_ns):  # new or changed file: nothing recorded for it
            self._stat, self._layout, self._complete, self._mm = (st.st_size, st.st_mtime_ns), [], False, None
        self.replays += bool(self._layout)
        self._it = self._local_samples(self._fh, self.count)

    def _local_samples(self, fh, start: int):
        """Samples start, start + 1, ... of a local shard: the recorded prefix replayed, the rest parsed (and
        recorded)."""
        layout = self._layout
        if start < len(layout):
            if self._mm is None:  # never closed explicitly: members handed out as views keep it alive
                # private (copy-on-write) rather than read-only: views of it are writable buffers, which torch
                # takes without a copy (decode_fbank); nothing writes to them, and writes could never reach the file
                self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            yield from _replay(self._mm, layout, start, self.buffer)
        if self._complete:
            return
        n = len(layout)
        end = layout[-1][2] if n else 0  # where the first sample not recorded yet starts
        fh.seek(end)
        spans: list = []
        for i, item in enumerate(iter_samples(fh, self.url, self.exts, spans, end), n):
            key, members, end = spans.pop()
            layout.append((key, _runs(members), end))
            if i >= start:
                yield item
        self._complete = True

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
                self._layout, self._complete, self._mm = [], False, None  # the retry parses the file again
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
            if members is not None and k in self.wanted:  # None: buffered already (a replay did not read it)
                self.buffer[k] = members
        if self.failure is not None:
            raise SampleError(self.failure.kind, key, self.shard, str(self.failure).split(": ", 2)[-1])
        raise SampleError("truncated", key, self.shard, "sample not in the shard")

    def close(self) -> None:
        self._close()
        self.buffer.clear()
        self._mm = None  # unmapped once the last member view handed out is gone


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
        st = self._streams.get(shard)
        if st is not None:
            self._streams.move_to_end(shard)
            return st
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


# The header np.save writes for a C-order [T, 80] array: {'descr': '<f2', 'fortran_order': False, 'shape': (T, 80), }
_NPY_HEADER = re.compile(rb"\{'descr': '(<f[248])', 'fortran_order': False, 'shape': \((\d+), (\d+)\), \} *\n")


def decode_fbank(data: bytes | memoryview, key: str, shard: str) -> np.ndarray:
    """.npy bytes (float16 [T, 80]) -> float32 [T, 80].

    The header np.save writes for our features is matched with one regex and the array taken from the buffer
    directly; anything else goes through np.load. NOTE: np.load parses every header with ast.literal_eval, ~25% of
    the stored-features loader's time in a profile. float16 is widened by torch, not numpy: numpy's float16 cast
    does not use the CPU's F16C instructions (~2 ns a value, a third of the ~60 us a stored-features sample
    costs through the loader), torch's is vectorized (4x faster); both are exact."""
    head = bytes(data[:256])  # the header as bytes (`data` may be a memoryview: slicing one allocates a view)
    m = _NPY_HEADER.match(head, 10) if head[:8] == b"\x93NUMPY\x01\x00" else None
    if m is not None and m.end() == 10 + int.from_bytes(head[8:10], "little"):
        t, f = int(m[2]), int(m[3])
        dtype = np.dtype(m[1].decode())
        n = t * f * dtype.itemsize
        if len(data) - m.end() < n:  # short: as np.load, which ignores extra bytes
            raise SampleError("bad_audio", key, shard, f"undecodable features: {len(data) - m.end()} data bytes, "
                              f"expected {n} for shape ({t}, {f})")
        if dtype == np.float16 and f == 80 and t > 0:
            # torch warns about read-only buffers: bytes are copied once into a bytearray (~1 us); a replayed
            # member is a view of a private (copy-on-write) map, writable, so it is read in place
            half = memoryview(data)[m.end():m.end() + n]
            half = torch.frombuffer(half if not half.readonly else bytearray(half), dtype=torch.float16)
            return half.view(t, f).float().numpy()
        x = np.frombuffer(data, dtype, t * f, m.end()).reshape(t, f)
    else:
        try:
            x = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as exc:
            raise SampleError("bad_audio", key, shard, f"undecodable features: {exc}") from None
    if x.ndim != 2 or x.shape[1] != 80:
        raise SampleError("bad_audio", key, shard, f"feature shape {x.shape}, expected [T, 80]")
    return x.astype(np.float32)


def decode_text(data: bytes | memoryview | None, key: str, shard: str) -> str:
    if data is None:
        return ""
    try:
        return str(data, "utf-8").strip()
    except UnicodeDecodeError as exc:
        raise SampleError("bad_text", key, shard, f"text is not UTF-8: {exc}") from None


def decode_meta(data: bytes) -> dict:
    return json.loads(data.decode("utf-8"))
