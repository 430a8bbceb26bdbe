"""Read the Parquet manifest, map rows to tasks, and drop the rows that are bad by metadata alone.

Checks here (on the manifest, before any shard is opened): empty text, over-long source/target, unknown task.
Checks on the shard contents happen in the loader when the sample is read: truncated members, undecodable
audio, NaN features, and members that differ from the build (text replaced, bytes flipped), caught by the
per-member CRC-32 the builder stores in the manifest's ``crc32`` column.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np

from hs_scale import tasks as T
from hs_scale.data import urls
from hs_scale.data.plan import Meta

log = logging.getLogger(__name__)


def read_manifest(path: str, columns: list[str] | None = None) -> dict[str, list]:
    """Columns of the manifest at `path` (a path or URL). Missing or unreadable manifests raise with the fix."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = urls.parent(path) if not path.startswith("pipe:") else path
    try:
        data = urls.read_bytes(path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"corpus manifest {path} not found: data.manifest must name a corpus built by `hs-scale prepare-data` "
            f"(build one with `hs-scale prepare-data --recipe demo --out {corpus}`, or import one with "
            f"`hs-scale prepare-data --from FORMAT ... --out {corpus}`)") from None
    except IsADirectoryError:
        raise FileNotFoundError(f"corpus manifest {path} is a directory; point data.manifest at the corpus") from None
    try:
        table = pq.read_table(pa.BufferReader(data), columns=columns)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise RuntimeError(
            f"corpus manifest {path} is unreadable ({type(exc).__name__}: {exc}); the file is damaged: check the "
            f"corpus with `hs-scale prepare-data --verify --out {corpus}` and rebuild it or restore the manifest"
        ) from None
    return table.to_pydict()


def row_tasks(cfg, lang: str, tgt_lang: str, domain: str | None) -> tuple[str, str, bool, str]:
    """(encoder task, decoder task, use_translation, effective target language) of one manifest row."""
    if cfg.target == "transcript":
        use_tr, tgt = False, lang
    elif cfg.target == "translation":
        use_tr, tgt = True, tgt_lang
    else:
        use_tr, tgt = tgt_lang != lang, tgt_lang
    return (T.encoder_task(cfg.task_key, lang, domain), T.decoder_task(cfg.task_key, tgt, domain), use_tr, tgt)


def infer_tasks(cfg) -> list[str]:
    """Every task name in the manifest (all splits, so ids agree between train and eval), sorted."""
    m = read_manifest(cfg.manifest_path, ["lang", "tgt_lang", "domain"])
    names = set()
    for lang, tgt, dom in zip(m["lang"], m["tgt_lang"], m["domain"], strict=True):
        e, d, _, _ = row_tasks(cfg, lang, tgt, dom or None)
        names.update((e, d))
    return sorted(names)


def load_meta(cfg, split: str, tokenizer, vocab: T.TaskVocab, on_bad) -> Meta:
    """Meta for one split. `on_bad(kind, key, shard, msg)` is called for every row dropped here."""
    m = read_manifest(cfg.manifest_path)
    speech = cfg.modality == "speech"
    idx = [i for i, s in enumerate(m["split"]) if s == split]
    if not idx:
        have = sorted(Counter(m["split"]))
        raise ValueError(f"split {split!r} has no rows in {cfg.manifest_path} (splits there: {have})")
    rows = []
    targets, sources = [], []
    crcs = m.get("crc32") or [""] * len(m["key"])  # corpora built before the column existed: not checked
    for i in idx:
        key, shard = m["key"][i], m["shard"][i]
        lang, tgt_lang, dom = m["lang"][i], m["tgt_lang"][i], m["domain"][i] or None
        try:
            enc, dec, use_tr, tgt = row_tasks(cfg, lang, tgt_lang, dom)
        except ValueError as exc:
            on_bad("unknown_task", key, shard, str(exc))
            continue
        if enc not in vocab or dec not in vocab:
            on_bad("unknown_task", key, shard, f"task {enc if enc not in vocab else dec!r} not in tasks {vocab.names}")
            continue
        text = (m["translation"][i] if use_tr else m["text"][i]) or ""
        if not text.strip() or (not speech and not (m["text"][i] or "").strip()):
            on_bad("empty_text", key, shard, "empty target or source text in the manifest")
            continue
        rows.append((i, enc, dec, use_tr, tgt))
        targets.append(text.strip())
        sources.append((m["text"][i] or "").strip())
    # Token lengths for planning: one batched encode (fast in SentencePiece), +1 for EOS.
    tgt_len = np.array([len(t) + 1 for t in tokenizer.encode_batch(targets)], np.int32) if targets else np.zeros(0)
    if speech:
        src_len = np.array([m["frames"][r[0]] for r in rows], np.int32)
        src_max = cfg.max_source_frames
    else:
        src_len = np.array([len(t) + 1 for t in tokenizer.encode_batch(sources)], np.int32) if sources else tgt_len
        src_max = cfg.max_source_tokens
    keep = []
    for j, r in enumerate(rows):
        key, shard = m["key"][r[0]], m["shard"][r[0]]
        if speech and src_len[j] <= 0:
            on_bad("bad_audio", key, shard, f"{src_len[j]} frames in the manifest")
        elif src_len[j] > src_max or tgt_len[j] > cfg.max_target_tokens:
            on_bad("too_long", key, shard, f"source {src_len[j]} > {src_max} or target {tgt_len[j]} > "
                   f"{cfg.max_target_tokens} (tokens incl. EOS)")
        else:
            keep.append(j)
    # Rows sorted by shard then manifest order, which is the order inside the shard for builder corpora.
    keep.sort(key=lambda j: (m["shard"][rows[j][0]], rows[j][0]))
    shards = sorted({m["shard"][rows[j][0]] for j in keep})
    shard_pos = {s: k for k, s in enumerate(shards)}
    stream_of = {}
    stream_names: list[str] = []
    stream = []
    for j in keep:
        _, enc, dec, _, _ = rows[j]
        name = enc if enc == dec else f"{enc}->{dec}"
        if name not in stream_of:
            stream_of[name] = len(stream_names)
            stream_names.append(name)
        stream.append(stream_of[name])
    # Stream ids by sorted name, so they do not depend on row order.
    order = np.argsort(stream_names, kind="stable")
    remap = np.empty(len(order), np.int32)
    remap[order] = np.arange(len(order))
    return Meta(
        keys=[m["key"][rows[j][0]] for j in keep],
        shards=shards,
        shard_idx=np.array([shard_pos[m["shard"][rows[j][0]]] for j in keep], np.int32),
        src_len=src_len[keep] if keep else np.zeros(0, np.int32),
        tgt_len=tgt_len[keep] if keep else np.zeros(0, np.int32),
        stream=remap[np.array(stream, np.int32)] if keep else np.zeros(0, np.int32),
        src_task=np.array([vocab.id(rows[j][1]) for j in keep], np.int64),
        tgt_task=np.array([vocab.id(rows[j][2]) for j in keep], np.int64),
        tgt_lang=[rows[j][4] for j in keep],
        use_translation=np.array([rows[j][3] for j in keep], bool),
        stream_names=[stream_names[i] for i in order],
        crc=[crcs[rows[j][0]] or "" for j in keep],
    )
