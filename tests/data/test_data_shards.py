"""The sequential tar reader (hs_scale.data.shards.iter_members) against Python's tarfile on every header format
tarfile writes (ustar, GNU long names, pax), with skipped members, short reads and damaged streams."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest

from hs_scale.data.shards import (
    SampleError,
    ShardStream,
    TarFormatError,
    check_crcs,
    decode_fbank,
    decode_text,
    iter_members,
    iter_samples,
    member_crcs,
)


def make_tar(fmt, members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        d = tarfile.TarInfo("adir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


class Trickle(io.RawIOBase):
    """A stream that returns at most 700 bytes per read (like a socket or a pipe)."""

    def __init__(self, data):
        self.f = io.BytesIO(data)

    def read(self, n=-1):
        return self.f.read(min(n, 700) if n >= 0 else 700)


MEMBERS = [("k1.flac", b"a" * 1000), ("k1.txt", "grüße".encode()), ("k2.flac", b""),
           ("d/" + "x" * 120 + ".txt", b"long name"), ("k3.fbank.npy", bytes(range(256)) * 9)]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_same_members_as_tarfile(fmt):
    members = MEMBERS if fmt != tarfile.USTAR_FORMAT else [m for m in MEMBERS if len(m[0]) < 100]
    data = make_tar(fmt, members)
    assert list(iter_members(io.BytesIO(data))) == members
    assert list(iter_members(Trickle(data))) == members
    kept = list(iter_members(io.BufferedReader(io.BytesIO(data)), exts={"txt"}))
    assert [(n, d if n.endswith(".txt") else b"") for n, d in members] == kept


def test_samples_and_damage():
    data = make_tar(tarfile.USTAR_FORMAT, [m for m in MEMBERS if len(m[0]) < 100])
    samples = list(iter_samples(io.BytesIO(data), "t", exts={"txt", "fbank.npy"}))
    assert [k for k, _ in samples] == ["k1", "k2", "k3"] and samples[0][1] == {"txt": "grüße".encode()}
    # Cut inside k2's header: k1 is complete but only known to be once the next header is read, so it rides on
    # the exception (the stream uses it when retries are exhausted).
    cut = data[:3072 + 100]
    got = []
    with pytest.raises(TarFormatError, match="unexpected end") as exc:
        for s in iter_samples(io.BytesIO(cut), "t"):
            got.append(s[0])
    assert got == [] and exc.value.pending[0] == "k1" and set(exc.value.pending[1]) == {"flac", "txt"}
    with pytest.raises(TarFormatError, match="not a tar"):
        list(iter_members(io.BytesIO(b"not a tar file at all" * 50)))


def test_shard_stream_retries_then_keeps_what_it_read(tmp_path):
    data = make_tar(tarfile.USTAR_FORMAT, [m for m in MEMBERS if len(m[0]) < 100])
    path = tmp_path / "s.tar"
    path.write_bytes(data[:3072 + 100])
    st = ShardStream(str(path), "s.tar", {"k1", "k2", "k3"}, retries=2)
    assert st.get("k1") == {"flac": b"a" * 1000, "txt": "grüße".encode()}
    assert st.opens == 3  # first try + 2 retries
    with pytest.raises(SampleError, match="truncated: sample 'k3' in shard s.tar: .*unexpected end"):
        st.get("k3")
    assert st.opens == 3  # given up: no more tries for samples past the break
    path.write_bytes(data)  # a fresh stream reads it all, in any request order
    st = ShardStream(str(path), "s.tar", {"k1", "k2", "k3"})
    assert st.get("k3")["fbank.npy"] == bytes(range(256)) * 9 and st.get("k1")["txt"] == "grüße".encode()
    assert st.get("k2") == {"flac": b""} and st.get("k1")["flac"] == b"a" * 1000 and st.opens == 2


def test_local_shard_replays_its_recorded_layout(tmp_path):
    """A re-read of an unchanged local shard replays the member offsets of the samples already parsed (then parses
    on), giving the same bytes; a changed file is parsed again."""
    members = [(f"k{i}.{ext}", f"{ext} of k{i}".encode() * (i + 1)) for i in range(5) for ext in ("flac", "txt")]
    path = tmp_path / "s.tar"
    path.write_bytes(make_tar(tarfile.GNU_FORMAT, members))
    want = {k: {"txt": f"txt of {k}".encode() * (int(k[1]) + 1)} for k in ("k0", "k1", "k2", "k3", "k4")}
    st = ShardStream(str(path), "s.tar", set(want), exts={"txt"})
    assert st.get("k1") == want["k1"] and st.buffer == {"k0": want["k0"]}
    st.buffer.clear()
    assert st.get("k0") == want["k0"]          # passed: re-opened; k0, k1 replayed, k2 parsed on from k1's end
    assert st.get("k3") == want["k3"] and st.get("k4") == want["k4"] and st.opens == 2 and st.replays == 1
    assert [k for k, _, _ in st._layout] == ["k0", "k1", "k2", "k3", "k4"] and not st._complete
    with pytest.raises(SampleError, match="not in the shard"):
        st.get("k9")                           # read to the end: the layout is complete
    assert st._complete and st.opens == 2
    st.buffer.clear()
    assert st.get("k2") == want["k2"] and st.get("k4") == want["k4"] and st.replays == 2
    held = st.buffer["k1"] = {"txt": b"held"}  # samples the stream holds are not read again by a replay
    assert sorted(st.buffer) == ["k0", "k1", "k3"] and st.get("k2") == want["k2"] and st.replays == 3
    assert st.buffer["k1"] is held and st.get("k1") is held
    members[8] = ("k4.flac", b"other")
    path.write_bytes(make_tar(tarfile.GNU_FORMAT, members))
    os.utime(path, ns=(1, 1))                  # a changed file (size or mtime): parsed again
    assert st.get("k2") == want["k2"] and st.replays == 3 and not st._complete and st.opens == 5


def test_decode_fbank_fast_path_matches_np_load():
    x = np.random.default_rng(0).standard_normal((37, 80)).astype(np.float16)
    for arr in (x, np.asfortranarray(x), x.astype(np.float32)):  # the fast path, then np.load's (fortran order)
        buf = io.BytesIO()
        np.save(buf, arr)
        got = decode_fbank(buf.getvalue(), "k", "s.tar")
        assert got.dtype == np.float32 and np.array_equal(got, arr.astype(np.float32))
    buf = io.BytesIO()
    np.save(buf, x)
    with pytest.raises(SampleError, match=r"bad_audio: .*5910 data bytes, expected 5920 for shape \(37, 80\)"):
        decode_fbank(buf.getvalue()[:-10], "k", "s.tar")
    with pytest.raises(SampleError, match=r"feature shape \(37, 40\)"):
        buf = io.BytesIO()
        np.save(buf, x[:, :40])
        decode_fbank(buf.getvalue(), "k", "s.tar")


def test_replay_hands_out_large_members_as_views_of_the_shard(tmp_path):
    """Re-reads of a local shard come from a private map of the file: features as writable views (decoded in
    place, equal to np.load), other members as bytes, the small members of a sample sliced out of one read."""
    feats = [np.random.default_rng(i).standard_normal((110 + 40 * i, 80)).astype(np.float16) for i in range(3)]
    members = []
    for i, x in enumerate(feats):
        buf = io.BytesIO()
        np.save(buf, x)
        members += [(f"k{i}.fbank.npy", buf.getvalue()), (f"k{i}.flac", b"f" * 20_000),
                    (f"k{i}.json", b"{}"), (f"k{i}.txt", f"text {i}".encode())]
    path = tmp_path / "s.tar"
    path.write_bytes(make_tar(tarfile.GNU_FORMAT, members))
    keys = {"k0", "k1", "k2"}
    st = ShardStream(str(path), "s.tar", keys, exts={"fbank.npy", "flac", "txt"})
    first = {k: st.get(k) for k in sorted(keys)}                    # parsed: bytes
    reads = {k: [read[2:] for read in r] for k, r, _ in st._layout}
    assert reads["k1"] == [((("fbank.npy", 0, len(members[4][1])),), True), ((("flac", 0, 20_000),), False),
                           ((("txt", 0, 6),), False)]
    again = {k: st.get(k) for k in sorted(keys)}                    # replayed from the map
    assert st.replays == 1 and again == first
    for i, k in enumerate(sorted(keys)):
        got = again[k]
        assert isinstance(got["fbank.npy"], memoryview) and not got["fbank.npy"].readonly
        assert isinstance(got["txt"], bytes) and decode_text(got["txt"], k, "s.tar") == f"text {i}"
        assert isinstance(got["flac"], bytes) and got["flac"] == b"f" * 20_000
        x = decode_fbank(got["fbank.npy"], k, "s.tar")
        assert x.dtype == np.float32 and np.array_equal(x, feats[i].astype(np.float32))
        assert check_crcs(got, member_crcs(first[k]), k, "s.tar") is None
    # the texts of a sample share one read when the members between them are small
    st2 = ShardStream(str(path), "s.tar", keys, exts={"json", "txt"})
    st2.get("k0")
    assert [read[2] for read in st2._layout[0][1]] == [(("json", 0, 2), ("txt", 1024, 1030))]
    st2.buffer.clear()
    assert st2.get("k0") == {"json": b"{}", "txt": b"text 0"} and st2.replays == 1


def test_check_crcs_checks_each_listed_member_only():
    members = {"txt": b"hallo", "translation.txt": b"hello", "fbank.npy": b"\0" * 100}
    listed = member_crcs(members)
    check_crcs(members, listed, "k", "s.tar")
    check_crcs({"txt": b"changed"}, "", "k", "s.tar")                             # old corpus: not checked
    check_crcs({"json": b"not listed"}, listed, "k", "s.tar")                      # not in the manifest
    for ext in members:  # "txt=" must not match inside "translation.txt="
        with pytest.raises(SampleError, match=rf"checksum: .* member \.{ext} does not match"):
            check_crcs({**members, ext: b"changed"}, listed, "k", "s.tar")
