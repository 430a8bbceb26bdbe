"""The streaming loader for decoder-only LMs (DataConfig.modality == "lm"): documents -> packed LMBatch.

Same contract as the seq2seq loader (hs_scale.data.loader; read its module docstring): explicit dp_rank/dp_size,
logical readers = dp_size x max(1, num_workers), an infinite train stream, a finite eval stream with padding batches
so every rank runs the same number of steps, bad documents counted and skipped by policy, and exact resume from a
plain-typed state holding the number of batches consumed.

Train plan (per reader, pure function of the manifest, the tokenizer, the config and the seed): each language
(stream) owns a share of its shards (plan.reader_rows); documents are drawn one at a time, the stream with
p ~ (n_s * w_s)^(1/T) (plan.stream_probs, so low-resource languages are upsampled at T > 1) and then the stream's
next document (plan's shard-ordered local shuffle, cycling per epoch). The document sequence is packed into rows
of seq_len (hs_scale.data.packing) and B = max_tokens_per_batch // seq_len rows make a batch.

Resume: the plan of batch k only needs document token lengths (computed from the manifest text at start), so a
resumed reader fast-forwards the plan to its next batch without reading anything, then re-opens the shards at the
documents it needs; a document split across the resume point is read again and only its remaining piece is used.
A document that cannot be read keeps its planned place as padding (so the plan, and resume, stay exact).

Eval plan: the split's documents in manifest (shard) order, packed once; batch i goes to rank i % dp_size.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch

from hs_scale import tasks as T
from hs_scale.data import urls
from hs_scale.data.config import ERROR_KINDS, DataConfig
from hs_scale.data.manifest import infer_tasks, read_manifest
from hs_scale.data.packing import LMBatch, Piece, fill_rows, pack_pieces
from hs_scale.data.plan import (
    BadSamples,
    Meta,
    PlannedLoader,
    _cycle_stream,
    _seed,
    reader_rows,
    require_same_plan,
    stream_probs,
)
from hs_scale.data.shards import TEXT, SampleError, StreamReader, check_crcs, decode_text

log = logging.getLogger(__name__)
_STATE_VERSION = 1
_CHOICE_CHUNK = 4096  # stream draws per rng call (fixed, so the draws do not depend on how far the plan is read)


def load_lm_meta(cfg: DataConfig, split: str, tokenizer, vocab: T.TaskVocab, on_bad) -> Meta:
    """Meta for one split of an LM corpus: one row per document, src_len = tgt_len = its packed length (BOS +
    tokens + EOS), stream = its task. Rows sorted by (shard, manifest order)."""
    m = read_manifest(cfg.manifest_path, ["key", "shard", "split", "lang", "domain", "text", "crc32"])
    idx = [i for i, s in enumerate(m["split"]) if s == split]
    if not idx:
        raise ValueError(f"split {split!r} has no rows in {cfg.manifest_path} "
                         f"(splits there: {sorted(set(m['split']))})")
    keep, tasks = [], []
    for i in idx:
        key, shard = m["key"][i], m["shard"][i]
        try:
            name = T.encoder_task(cfg.task_key, m["lang"][i], m["domain"][i] or None)
        except ValueError as exc:
            on_bad("unknown_task", key, shard, str(exc))
            continue
        if name not in vocab:
            on_bad("unknown_task", key, shard, f"task {name!r} not in tasks {vocab.names}")
            continue
        if not (m["text"][i] or "").strip():
            on_bad("empty_text", key, shard, "empty document in the manifest")
            continue
        keep.append(i)
        tasks.append(name)
    keep_order = sorted(range(len(keep)), key=lambda j: (m["shard"][keep[j]], keep[j]))
    keep, tasks = [keep[j] for j in keep_order], [tasks[j] for j in keep_order]
    lens = np.array([len(t) + 2 for t in tokenizer.encode_batch([m["text"][i].strip() for i in keep])], np.int32)
    shards = sorted({m["shard"][i] for i in keep})
    shard_pos = {s: k for k, s in enumerate(shards)}
    names = sorted(set(tasks))
    stream = np.array([names.index(t) for t in tasks], np.int32)
    task_ids = np.array([vocab.id(t) for t in tasks], np.int64)
    crcs = m["crc32"] or [""] * len(m["key"])
    return Meta(keys=[m["key"][i] for i in keep], shards=shards,
                shard_idx=np.array([shard_pos[m["shard"][i]] for i in keep], np.int32), src_len=lens, tgt_len=lens,
                stream=stream, src_task=task_ids, tgt_task=task_ids, tgt_lang=[m["lang"][i] for i in keep],
                use_translation=np.zeros(len(keep), bool), stream_names=names, crc=[crcs[i] or "" for i in keep])


def _train_docs(meta: Meta, cfg: DataConfig, reader: int, num_readers: int) -> Iterator[int]:
    """Infinite sequence of row ids (documents) for one reader."""
    units = reader_rows(meta, reader, num_readers)
    if not units:
        raise RuntimeError(f"reader {reader} of {num_readers} (dp_rank x workers) has no training documents: the "
                           f"split has only {len(meta)}; use fewer workers/ranks or a larger corpus")
    streams = sorted(units)
    p = stream_probs(meta, cfg.sampling_temperature, cfg.task_weights)[streams]
    p = p / p.sum()
    iters = [_cycle_stream(units[s], cfg.shuffle_window, cfg.seed, reader, s) for s in streams]
    rng = _seed(cfg.seed, 19, reader)
    while True:
        for c in rng.choice(len(streams), size=_CHOICE_CHUNK, p=p).tolist():
            yield next(iters[c])


def _batches(docs: Iterator[int], meta: Meta, seq_len: int, rows: int) -> Iterator[tuple[list[list[Piece]], dict]]:
    """(rows of pieces, {stream position: row id}) per batch, from a document sequence."""
    seq: dict[int, int] = {}

    def lengths():
        for pos, r in enumerate(docs):
            seq[pos] = r
            yield int(meta.tgt_len[r])

    batch: list[list[Piece]] = []
    for row in pack_pieces(lengths(), seq_len):
        batch.append(row)
        if len(batch) == rows:
            yield batch, {pc.doc: seq[pc.doc] for r in batch for pc in r}
            first = batch[-1][-1].doc  # documents before the last piece's one are done: forget them
            for d in [d for d in seq if d < first]:
                del seq[d]
            batch = []
    if batch:
        yield batch, {pc.doc: seq[pc.doc] for r in batch for pc in r}


def eval_lm_plan(meta: Meta, cfg: DataConfig, dp_rank: int, dp_size: int) -> list[tuple[list, dict, bool]]:
    """This rank's eval batches as (rows of pieces, {stream position: row id}, is_padding)."""
    allb = list(_batches(iter(range(len(meta))), meta, cfg.seq_len, cfg.lm_rows_per_batch))
    if not allb:
        return []
    per_rank = -(-len(allb) // dp_size)
    out = []
    for j in range(per_rank):
        i = j * dp_size + dp_rank
        out.append((*allb[i], False) if i < len(allb) else (*allb[i % len(allb)], True))
    return out


class _LMDataset(torch.utils.data.IterableDataset):
    """Runs in each DataLoader worker (or the main process when num_workers=0)."""

    def __init__(self, cfg: DataConfig, meta: Meta, tokenizer, train: bool, dp_rank: int, dp_size: int, start: int):
        self.cfg, self.meta, self.tok, self.train = cfg, meta, tokenizer, train
        self.dp_rank, self.dp_size, self.start = dp_rank, dp_size, start
        self.W = max(1, cfg.num_workers)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if info is not None:
            torch.set_num_threads(1)
        j = info.id if info is not None else 0
        reader = (self.start + j) % self.W
        first = (self.start + j) // self.W
        gid = self.dp_rank * self.W + reader
        if self.train:
            units = reader_rows(self.meta, gid, self.dp_size * self.W)
            mine = np.concatenate([u for us in units.values() for u in us]) if units else np.zeros(0, int)
            plan = ((rows, docs, False) for rows, docs in
                    _batches(_train_docs(self.meta, self.cfg, gid, self.dp_size * self.W), self.meta,
                             self.cfg.seq_len, self.cfg.lm_rows_per_batch))
        else:
            batches = eval_lm_plan(self.meta, self.cfg, self.dp_rank, self.dp_size)[reader :: self.W]
            mine = np.unique([r for _, docs, _ in batches for r in docs.values()]).astype(int)
            plan = iter(batches)
        wanted: dict[str, set[str]] = {}
        for r in mine.tolist():
            wanted.setdefault(self.meta.shards[int(self.meta.shard_idx[r])], set()).add(self.meta.keys[r])
        self._io = StreamReader(self.cfg.corpus_dir, wanted, self.cfg.io_retries, self.cfg.io_timeout, exts={TEXT})
        cache: dict[int, tuple[np.ndarray, int] | None] = {}  # stream position -> tokens of a split document
        errors_of: dict[int, tuple] = {}
        try:
            for k, (rows, docs, pad) in enumerate(plan):
                if k < first:  # fast-forward on resume: plan only, nothing read
                    continue
                errors = []
                for pos, r in docs.items():
                    if pos not in cache:
                        cache[pos] = self._doc(r, errors_of, pos)
                    if pos in errors_of:
                        errors.append(errors_of.pop(pos))
                b = fill_rows(rows, cache, self.cfg.seq_len, self.tok.pad_id,
                              keys={pos: self.meta.keys[r] for pos, r in docs.items()})
                last = rows[-1][-1]
                # Keep only a document that continues into the next batch.
                keep = last.doc if last.stop < int(self.meta.tgt_len[docs[last.doc]]) else None
                cache = {keep: cache[keep]} if keep is not None else {}
                b.reader, b.plan_index, b.errors, b.is_padding = reader, k, errors, pad
                yield b
        finally:
            self._io.close()

    def _doc(self, r: int, errors_of: dict, pos: int) -> tuple[np.ndarray, int] | None:
        m = self.meta
        key, shard = m.keys[r], m.shards[int(m.shard_idx[r])]
        try:
            members = self._io.get(shard, key)
            if TEXT not in members:
                raise SampleError("truncated", key, shard, "member .txt missing")
            check_crcs({TEXT: members[TEXT]}, m.crc[r] if m.crc else "", key, shard)
            text = decode_text(members[TEXT], key, shard)
            ids = [self.tok.bos_id] + self.tok.encode(text) + [self.tok.eos_id]
            if len(ids) != int(m.tgt_len[r]):  # the plan was made from the manifest's text
                raise SampleError("checksum", key, shard, f"{len(ids)} tokens, the manifest's text has "
                                  f"{int(m.tgt_len[r])}: the shard and the manifest disagree")
            return np.asarray(ids, np.int64), int(m.src_task[r])
        except SampleError as exc:
            if self.cfg.on_error == "raise":
                raise RuntimeError(f"bad sample (on_error=raise): {exc}") from None
            errors_of[pos] = (exc.kind, exc.key, exc.shard, str(exc))
            return None


class LMStreamLoader(PlannedLoader):
    """Iterable of LMBatch for one data-parallel rank; the interface of hs_scale.data.loader.StreamLoader
    (`tasks`, `error_counts`, `state_dict()` / `load_state_dict()`, `stats()`)."""

    def __init__(self, cfg: DataConfig, split: str, dp_rank: int, dp_size: int, tokenizer, train: bool):
        self.check_rank(dp_rank, dp_size)
        self.cfg, self.split, self.dp_rank, self.dp_size = cfg, split, dp_rank, dp_size
        self.tokenizer, self.train = tokenizer, train
        self.tasks = T.TaskVocab(list(cfg.tasks) or infer_tasks(cfg))
        self.bad = BadSamples(cfg.on_error, ERROR_KINDS, "document")
        self.missing_tasks: list[str] = []
        self._consumed = self._tokens = self._padding = 0
        self._task_tokens: Counter = Counter()
        self.meta = load_lm_meta(cfg, split, tokenizer, self.tasks, self.bad)
        if len(self.meta) == 0:
            raise RuntimeError(f"split {split!r} of {cfg.manifest_path}: every document was dropped "
                               f"({dict(self.bad.counts)})")
        missing = [s for s in self.meta.shards if not urls.exists(urls.join(cfg.corpus_dir, s), cfg.io_timeout)]
        if len(missing) == len(self.meta.shards):
            raise FileNotFoundError(f"none of the {len(missing)} shards of split {split!r} exist under "
                                    f"{cfg.corpus_dir} (e.g. {missing[0]}); is `manifest` the right corpus?")
        for s in missing:
            log.warning("shard %s is missing: its documents will count as 'io_error'", s)
        self._plan_len = None if train else len(eval_lm_plan(self.meta, cfg, dp_rank, dp_size))


    def __iter__(self):
        cfg = self.cfg
        if not self.train:
            self._consumed = 0
        ds = _LMDataset(cfg, self.meta, self.tokenizer, self.train, self.dp_rank, self.dp_size, self._consumed)
        if cfg.num_workers > 0:
            it = iter(torch.utils.data.DataLoader(
                ds, batch_size=None, num_workers=cfg.num_workers, prefetch_factor=cfg.prefetch_factor,
                multiprocessing_context=cfg.worker_start_method or None, persistent_workers=False))
        else:
            it = iter(ds)
        try:
            for b in it:
                self._consumed += 1
                for kind, key, shard, msg in b.errors:
                    self.bad(kind, key, shard, msg)
                b.errors = []
                self._count(b)
                yield b
        finally:
            if hasattr(it, "_shutdown_workers"):
                try:
                    it._shutdown_workers()
                except RuntimeError as exc:
                    log.debug("DataLoader worker shutdown: %s", exc)

    def _count(self, b: LMBatch) -> None:
        if b.is_padding:
            self._padding += 1
            return
        counts = b.task_token_counts(len(self.tasks)).tolist()
        self._tokens += sum(counts)
        for t, n in enumerate(counts):
            if n:
                self._task_tokens[self.tasks.names[t]] += n

    def state_dict(self) -> dict:
        """Plain-typed state (JSON / torch.save(weights_only) safe): restore it to continue exactly."""
        return {"version": _STATE_VERSION, "kind": "lm", "split": self.split, "dp_rank": self.dp_rank,
                "dp_size": self.dp_size, "num_workers": self.cfg.num_workers, "seed": self.cfg.seed,
                "seq_len": self.cfg.seq_len, "rows_per_batch": self.cfg.lm_rows_per_batch,
                "num_rows": len(self.meta), "consumed": self._consumed, "tokens": self._tokens,
                **self.bad.state(),
                "task_tokens": dict(self._task_tokens)}

    def load_state_dict(self, state: dict) -> None:
        require_same_plan(state, self.state_dict(), ("kind", "split", "dp_rank", "dp_size", "num_workers", "seed",
                                                     "seq_len", "rows_per_batch", "num_rows"), "packing")
        self._consumed, self._tokens = int(state["consumed"]), int(state["tokens"])
        self.bad.load(state)
        self._task_tokens = Counter(state["task_tokens"])

    def stats(self) -> dict:
        out = {"batches": self._consumed, "tokens": self._tokens, "padding_batches": self._padding,
               "errors": self.bad.nonzero(), "task_tokens": dict(self._task_tokens)}
        if self.missing_tasks:
            out["missing_tasks"] = list(self.missing_tasks)
        return out
