"""Writing WebDataset tar shards and the Parquet manifest; `verify` checks shards against the manifest.

One sample = members ``<key>.flac`` (16 kHz PCM_16 FLAC, speech only), ``<key>.fbank.npy`` (optional float16
[T, 80] raw log-mel, before CMVN), ``<key>.txt`` (transcript / source text), ``<key>.translation.txt`` and
``<key>.json`` (metadata). Tars are byte-reproducible: fixed mtime/uid/mode and member order.

Manifest columns: key, shard (relative to the corpus dir), split, lang, tgt_lang, domain, duration (s),
frames (fbank frames; 0 for text), text, translation, checksum (sha1 over the sample's members, what `verify`
checks), crc32 (per-member CRC-32 "ext=xxxxxxxx ...", what the loader checks on every read).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import numpy as np

from hs_scale.data.shards import AUDIO, FBANK, META, TEXT, TRANSLATION, member_crcs

MANIFEST_COLUMNS = ["key", "shard", "split", "lang", "tgt_lang", "domain", "duration", "frames", "text",
                    "translation", "checksum", "crc32"]


def member_checksum(members: dict[str, bytes]) -> str:
    """sha1 over (ext, bytes) in sorted ext order: what `verify` recomputes from the tar."""
    h = hashlib.sha1()
    for ext in sorted(members):
        h.update(ext.encode() + b"\0" + len(members[ext]).to_bytes(8, "big"))
        h.update(members[ext])
    return h.hexdigest()


def encode_flac(wav: np.ndarray) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wav, 16_000, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def encode_npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def encode_sample(text: str, translation: str, meta: dict, flac: bytes | None = None,
                  fbank16: np.ndarray | None = None) -> dict[str, bytes]:
    members = {TEXT: text.encode("utf-8"), TRANSLATION: translation.encode("utf-8"),
               META: json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")}
    if flac is not None:
        members[AUDIO] = flac
    if fbank16 is not None:
        members[FBANK] = encode_npy(fbank16.astype(np.float16))
    return members


class TarWriter:
    """Deterministic tar writer: `write(key, members)` -> (sha1 checksum, per-member CRC-32 string)."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._tmp = path + ".tmp"
        self.path = path
        self._tf = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)

    def write(self, key: str, members: dict[str, bytes]) -> tuple[str, str]:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/' (webdataset splits on them)")
        for ext in sorted(members):
            ti = tarfile.TarInfo(f"{key}.{ext}")
            ti.size, ti.mtime, ti.mode, ti.uid, ti.gid = len(members[ext]), 0, 0o444, 0, 0
            self._tf.addfile(ti, io.BytesIO(members[ext]))
        return member_checksum(members), member_crcs(members)

    def close(self) -> None:
        self._tf.close()
        os.replace(self._tmp, self.path)  # a crash mid-shard never leaves a half-written tar under the real name


def write_manifest(rows: list[dict], path: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("key", pa.string()), ("shard", pa.string()), ("split", pa.string()), ("lang", pa.string()),
        ("tgt_lang", pa.string()), ("domain", pa.string()), ("duration", pa.float32()), ("frames", pa.int32()),
        ("text", pa.string()), ("translation", pa.string()), ("checksum", pa.string()), ("crc32", pa.string()),
    ])
    cols = {c: [r[c] for r in rows] for c in MANIFEST_COLUMNS}
    pq.write_table(pa.table(cols, schema=schema), path, compression="zstd")


def verify(corpus_dir: str, deep: bool = False, max_report: int = 20) -> list[str]:
    """Check every manifest row against its shard: member present and complete, checksum, CRC-32s, text,
    translation. Each shard is streamed once, front to back (so this works on any corpus URL too).

    deep=True also decodes audio and checks duration/frames. Returns a list of problems (empty = OK).
    """
    from collections import defaultdict

    from hs_scale.data import urls
    from hs_scale.data.features import num_frames
    from hs_scale.data.manifest import read_manifest
    from hs_scale.data.shards import SampleError, check_crcs, decode_audio, decode_text, iter_samples

    m = read_manifest(urls.join(corpus_dir, "manifest.parquet"))
    table = [dict(zip(m, vals, strict=True)) for vals in zip(*m.values(), strict=True)]
    problems: list[str] = []
    seen_keys = set()
    by_shard: dict[str, list[dict]] = defaultdict(list)
    for row in table:
        if row["key"] in seen_keys:
            problems.append(f"{row['shard']}: duplicate key {row['key']}")
        seen_keys.add(row["key"])
        by_shard[row["shard"]].append(row)
    for shard, rows in sorted(by_shard.items()):
        url = urls.join(corpus_dir, shard)
        samples: dict[str, dict[str, bytes]] = {}
        try:
            with urls.open_url(url) as fh:
                for key, members in iter_samples(fh, url):
                    samples[key] = members
        except FileNotFoundError:
            problems.append(f"{shard}: shard file missing ({len(rows)} samples)")
            continue
        except Exception as exc:  # a damaged tar: check what could be read
            problems.append(f"{shard}: damaged after {len(samples)} samples: {type(exc).__name__}: {exc}")
        for row in rows:
            key = row["key"]
            data = samples.get(key)
            if data is None:
                problems.append(f"{shard}: key {key} missing")
                continue
            if member_checksum(data) != row["checksum"]:
                problems.append(f"{shard}: key {key} checksum mismatch")
            try:
                check_crcs(data, row.get("crc32") or "", key, shard)
                if decode_text(data.get(TEXT), key, shard) != row["text"]:
                    problems.append(f"{shard}: key {key} text differs from the manifest")
                if decode_text(data.get(TRANSLATION), key, shard) != row["translation"]:
                    problems.append(f"{shard}: key {key} translation differs from the manifest")
                if deep and AUDIO in data:
                    wav = decode_audio(data[AUDIO], key, shard)
                    if num_frames(len(wav)) != row["frames"] or abs(len(wav) / 16000 - row["duration"]) > 1e-3:
                        problems.append(f"{shard}: key {key} duration/frames differ from the manifest")
            except SampleError as exc:
                problems.append(str(exc))
        if len(samples) != len(rows):
            problems.append(f"{shard}: tar holds {len(samples)} samples, manifest lists {len(rows)}")
    return problems
