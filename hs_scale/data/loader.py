"""The streaming loader: plans (plan.py) -> sequential shard streams (shards.py) -> decoded, augmented, collated
Batches.

Distributed contract: dp_rank/dp_size are explicit arguments and the DataLoader worker id comes from
`torch.utils.data.get_worker_info()`; nothing is read from RANK/WORLD_SIZE (under spawn, Ray or torchrun those
describe the process, not the data-parallel replica, and workers never see the process group). All tensor/pipeline
ranks of one replica pass the same dp_rank and so get identical batches.

Uneven data: the train loader never ends (streams cycle, see plan.py), so no rank runs out before another; the
trainer decides the step count. The eval loader ends after the same number of batches on every rank (padding
batches flagged `is_padding`).

Streaming: a reader plans a pool of batches (train) or a group of consecutive batches (eval), reads the rows they
need from its shard streams in shard order (each shard front to back, see shards.py), then decodes batch by batch.

Exact resume: logical reader w produces planned batches 0, 1, 2, ...; the DataLoader hands them out round-robin,
so the loader's n-th batch is reader n % W's batch n // W. The state is n (plus the bad samples seen); on resume
physical worker j plays reader (n + j) % W from planned batch (n + j) // W, fast-forwarding the plan without
reading anything, then re-opens the shards it needs and skips the consumed members sequentially. This position
(shard + members passed) is each reader's stream cursor: a pure function of n and the plan, so it needs no state of
its own. A planned batch whose samples are all bad still yields an (empty) marker so this count stays exact.

Error counts are unique bad samples per kind (a sample met again in a later epoch is not counted again).
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import torch

from hs_scale import tasks as T
from hs_scale.data import features as F
from hs_scale.data import urls
from hs_scale.data.batch import Batch, collate, empty_batch
from hs_scale.data.config import ERROR_KINDS, DataConfig
from hs_scale.data.manifest import infer_tasks, load_meta
from hs_scale.data.plan import BadSamples, Meta, PlannedLoader, eval_plan, reader_rows, require_same_plan, train_pools
from hs_scale.data.shards import (
    AUDIO,
    FBANK,
    TEXT,
    TRANSLATION,
    SampleError,
    StreamReader,
    check_crcs,
    decode_audio,
    decode_fbank,
    decode_text,
)

log = logging.getLogger(__name__)
_STATE_VERSION = 1


class _Dataset(torch.utils.data.IterableDataset):
    """Runs in each DataLoader worker (or the main process when num_workers=0)."""

    def __init__(self, cfg: DataConfig, meta: Meta, tokenizer, train: bool, dp_rank: int, dp_size: int,
                 start: int, cmvn: F.CMVN | None):
        self.cfg, self.meta, self.tok, self.train = cfg, meta, tokenizer, train
        self.dp_rank, self.dp_size, self.start, self.cmvn = dp_rank, dp_size, start, cmvn
        self.W = max(1, cfg.num_workers)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if info is not None:  # NOTE: W workers x N torch threads would oversubscribe the cores (never in main)
            torch.set_num_threads(1)
        j = info.id if info is not None else 0
        reader = (self.start + j) % self.W
        self._reader = self.dp_rank * self.W + reader
        first = (self.start + j) // self.W
        self._ok, self._bad_shards, self._first_err = 0, set(), None
        if self.train:
            units = reader_rows(self.meta, self._reader, self.dp_size * self.W)
            groups = self._train_groups(reader)
            wanted_rows = np.concatenate([u for us in units.values() for u in us]) if units else np.zeros(0, int)
        else:
            mine = eval_plan(self.meta, self.cfg, self.dp_rank, self.dp_size)[reader :: self.W]
            groups = self._eval_groups(mine)
            wanted_rows = np.concatenate([b for b, _ in mine]) if mine else np.zeros(0, int)
        wanted: dict[str, set[str]] = {}
        for r in wanted_rows.tolist():
            wanted.setdefault(self.meta.shards[int(self.meta.shard_idx[r])], set()).add(self.meta.keys[r])
        # Only the members some sample needs are read (the others are skipped over in the stream).
        exts = {TEXT, TRANSLATION} | ({FBANK if self.cfg.precomputed_features else AUDIO}
                                      if self.cfg.modality == "speech" else set())
        self._io = StreamReader(self.cfg.corpus_dir, wanted, self.cfg.io_retries, self.cfg.io_timeout, exts=exts)
        try:
            k = 0
            for group in groups:  # group: [(rows, is_padding)] of consecutive planned batches
                todo = [(k + i, rows, pad) for i, (rows, pad) in enumerate(group) if k + i >= first]
                k += len(group)
                if not todo:  # fast-forward on resume: plan only, nothing read
                    continue
                raw = self._fetch(np.concatenate([rows for _, rows, _ in todo]))
                for kk, rows, pad in todo:
                    yield self._make(rows, reader, kk, pad, raw)
        finally:
            self._io.close()

    def _train_groups(self, reader: int):
        for pool in train_pools(self.meta, self.cfg, self._reader, self.dp_size * self.W):
            yield [(b, False) for b in pool]

    def _eval_groups(self, mine: list):
        """Consecutive eval batches in groups of about `bucket_pool` rows (each group is one pass over its
        shards, so raw bytes of at most one group are held)."""
        group, n = [], 0
        for rows, pad in mine:
            group.append((rows, pad))
            n += len(rows)
            if n >= self.cfg.bucket_pool:
                yield group
                group, n = [], 0
        if group:
            yield group

    def _exts(self, r: int) -> tuple[str, ...]:
        """The members sample row r needs."""
        speech = self.cfg.modality == "speech"
        tgt_ext = TRANSLATION if self.meta.use_translation[r] else TEXT
        exts = (tgt_ext,) if speech else tuple(dict.fromkeys((TEXT, tgt_ext)))
        if speech:
            exts += (FBANK,) if self.cfg.precomputed_features else (AUDIO,)
        return exts

    def _fetch(self, rows: np.ndarray) -> dict[int, dict[str, bytes] | SampleError]:
        """Raw members of `rows`, read in shard order (each shard front to back), checked against the manifest's
        CRC-32; members a sample does not need are dropped here to bound memory. Failures are kept per row."""
        m = self.meta
        out: dict[int, dict[str, bytes] | SampleError] = {}
        for r in np.unique(rows).tolist():  # row ids are sorted by (shard, position in shard)
            key, shard = m.keys[r], m.shards[int(m.shard_idx[r])]
            try:
                members = self._io.get(shard, key)
                keep = {e: members[e] for e in self._exts(r) if e in members}
                check_crcs(keep, m.crc[r] if m.crc else "", key, shard)
                out[r] = keep
            except SampleError as exc:
                out[r] = exc
        return out

    def _make(self, rows: np.ndarray, reader: int, k: int, pad: bool, raw: dict) -> Batch:
        samples, errors = [], []
        for pos, r in enumerate(rows.tolist()):
            try:
                samples.append(self._sample(r, reader, k, pos, raw[r]))
                self._ok += 1
            except SampleError as exc:
                if self.cfg.on_error == "raise":
                    raise RuntimeError(f"bad sample (on_error=raise): {exc}") from None
                errors.append((exc.kind, exc.key, exc.shard, str(exc)))
                self._bad_shards.add(exc.shard)
                self._first_err = self._first_err or str(exc)
        if not samples:
            self._check_all_bad()
            return empty_batch(reader, k, errors)
        b = collate(samples, self.tok, self.cfg.decoder_start)
        b.reader, b.plan_index, b.errors, b.is_padding = reader, k, errors, pad
        return b

    def _check_all_bad(self) -> None:
        if self._ok:
            return
        if self.train:
            units = reader_rows(self.meta, self._reader, self.dp_size * self.W)
            mine = {self.meta.shards[int(self.meta.shard_idx[u[0]])] for us in units.values() for u in us}
        else:
            mine = {self.meta.shards[i] for i in np.unique(self.meta.shard_idx)}
        if mine and mine <= self._bad_shards:
            raise RuntimeError(
                f"all {len(mine)} shards this reader owns are bad (no sample could be read); first error: "
                f"{self._first_err}. Check the corpus with `hs-scale prepare-data --verify --out <corpus>`"
            )

    def _sample(self, r: int, reader: int, k: int, pos: int, data: dict[str, bytes] | SampleError) -> dict:
        m, cfg = self.meta, self.cfg
        key, shard = m.keys[r], m.shards[int(m.shard_idx[r])]
        if isinstance(data, SampleError):
            raise data
        speech = cfg.modality == "speech"
        tgt_ext = TRANSLATION if m.use_translation[r] else TEXT
        for ext in self._exts(r):
            if ext not in data and ext != TRANSLATION:
                raise SampleError("truncated", key, shard, f"member .{ext} missing")
        s = {"key": key, "tgt_lang": m.tgt_lang[r], "src_task": int(m.src_task[r]), "tgt_task": int(m.tgt_task[r])}
        tgt_text = decode_text(data.get(tgt_ext), key, shard)
        if not tgt_text:
            raise SampleError("empty_text", key, shard, f"empty .{tgt_ext} in the shard")
        s["tgt_ids"] = self.tok.encode(tgt_text)
        if len(s["tgt_ids"]) + 1 > cfg.max_target_tokens:
            raise SampleError("too_long", key, shard,
                              f"target {len(s['tgt_ids']) + 1} tokens > {cfg.max_target_tokens}")
        if not speech:
            src_text = decode_text(data.get(TEXT), key, shard)
            if not src_text:
                raise SampleError("empty_text", key, shard, "empty source text in the shard")
            s["src_ids"] = self.tok.encode(src_text) + [self.tok.eos_id]
            if len(s["src_ids"]) > cfg.max_source_tokens:
                raise SampleError("too_long", key, shard, f"source {len(s['src_ids'])} > {cfg.max_source_tokens}")
            return s
        if cfg.precomputed_features:
            x = decode_fbank(data[FBANK], key, shard)
        else:
            x = F.fbank(decode_audio(data[AUDIO], key, shard))
        if len(x) == 0:
            raise SampleError("bad_audio", key, shard, "audio shorter than one 25 ms frame")
        if len(x) > cfg.max_source_frames:
            raise SampleError("too_long", key, shard, f"{len(x)} frames > {cfg.max_source_frames}")
        if not np.isfinite(x).all():
            raise SampleError("nan_features", key, shard, "features contain NaN/inf")
        # Global CMVN is the model's (folded into its first convolution, so that padding is raw zeros as in an HF
        # export; hs_scale.models.s2t.Conv1dSubsampler): raw features here, masks filled with the raw mean.
        in_model = self.cmvn is not None and self.cmvn.mode == "global"
        x = self.cmvn(x) if self.cmvn is not None and not in_model else x
        if self.train and cfg.spec_augment:
            # Seeded by (seed, rank, reader, planned batch, position): a resumed run masks identically.
            rng = np.random.default_rng([cfg.seed, 17, self.dp_rank, reader, k, pos])
            x = F.spec_augment(x, rng, cfg.freq_masks, cfg.freq_mask_width, cfg.time_masks, cfg.time_mask_width,
                               fill=self.cmvn.mean if in_model else 0.0)
        s["feats"] = x
        return s


class StreamLoader(PlannedLoader):
    """Iterable of Batch for one data-parallel rank. See the module docstring for the contract.

    Attributes: `tasks` (TaskVocab), `bad` (BadSamples: `error_counts` = bad.counts, kind -> unique bad
    samples; bad.recent: the last 100 (kind, key, shard)), `missing_tasks` (streams dropped because all their
    shards are missing), `stats()`.
    `state_dict()` / `load_state_dict()` hold plain ints/strs/dicts only.
    """

    def __init__(self, cfg: DataConfig, split: str, dp_rank: int, dp_size: int, tokenizer, train: bool):
        self.check_rank(dp_rank, dp_size)
        self.cfg, self.split, self.dp_rank, self.dp_size = cfg, split, dp_rank, dp_size
        self.tokenizer, self.train = tokenizer, train
        self.tasks = T.TaskVocab(list(cfg.tasks) or infer_tasks(cfg))
        self.bad = BadSamples(cfg.on_error, ERROR_KINDS, "sample")
        self.missing_tasks: list[str] = []
        self._consumed = 0
        self._samples = 0
        self._padding = 0
        self._task_samples: Counter = Counter()
        self.meta = load_meta(cfg, split, tokenizer, self.tasks, self.bad)
        if len(self.meta) == 0:
            raise RuntimeError(
                f"split {split!r} of {cfg.manifest_path}: every row was dropped ({dict(self.bad.counts)})")
        self._check_shards_exist()
        if len(self.meta) == 0:
            raise RuntimeError(f"split {split!r} of {cfg.manifest_path}: no task has any shard left")
        self.cmvn = F.CMVN.from_corpus(cfg.corpus_dir, cfg.cmvn) if cfg.modality == "speech" else None
        self._plan_len = len(eval_plan(self.meta, cfg, dp_rank, dp_size)) if not train else None

    # ---- errors -------------------------------------------------------------------------------------------

    def _check_shards_exist(self) -> None:
        """Refuse a split none of whose shards exist, and (train) a task all of whose shards are missing."""
        from concurrent.futures import ThreadPoolExecutor

        corpus = self.cfg.corpus_dir
        # Remote: one HEAD per shard, 16 at a time (metadata only; the shards are streamed later).
        with ThreadPoolExecutor(16 if urls.is_remote(corpus) else 1) as pool:
            found = list(pool.map(lambda s: urls.exists(urls.join(corpus, s), self.cfg.io_timeout), self.meta.shards))
        missing = {s for s, ok in zip(self.meta.shards, found, strict=True) if not ok}
        if missing and len(missing) == len(self.meta.shards):
            raise FileNotFoundError(f"none of the {len(missing)} shards of split {self.split!r} exist under "
                                    f"{corpus} (e.g. {sorted(missing)[0]}); is `manifest` the right corpus?")
        for s in sorted(missing):
            log.warning("shard %s is missing: its samples will count as 'io_error'", s)
        if not missing or not self.train:
            return
        m = self.meta
        gone = [i for i, name in enumerate(m.stream_names)
                if all(m.shards[sh] in missing for sh in np.unique(m.shard_idx[m.stream == i]).tolist())]
        if not gone:
            return
        names = [m.stream_names[i] for i in gone]
        msg = (f"every training shard of task(s) {names} is missing under {corpus} (e.g. "
               f"{m.shards[int(m.shard_idx[np.flatnonzero(m.stream == gone[0])[0]])]})")
        if self.cfg.on_missing_task == "raise":
            raise FileNotFoundError(f"{msg}: restore the shards, or set data.on_missing_task=warn to train "
                                    "without these tasks")
        log.error("%s: TRAINING WITHOUT THEM (data.on_missing_task=warn); they are reported in the run's result",
                  msg)
        self.missing_tasks = names
        self.meta = m.subset(~np.isin(m.stream, gone))

    # ---- iteration ----------------------------------------------------------------------------------------
    def __iter__(self):
        cfg = self.cfg
        if not self.train:
            self._consumed = 0  # eval always runs from the start
        ds = _Dataset(cfg, self.meta, self.tokenizer, self.train, self.dp_rank, self.dp_size, self._consumed,
                      self.cmvn)
        if cfg.num_workers > 0:
            it = iter(torch.utils.data.DataLoader(
                ds, batch_size=None, num_workers=cfg.num_workers, prefetch_factor=cfg.prefetch_factor,
                multiprocessing_context=cfg.worker_start_method or None, persistent_workers=False,
            ))
        else:
            it = iter(ds)
        try:
            yield from self._drain(it)
        finally:
            # A trainer that stops early (or a resume test) abandons this generator: stop the workers now rather
            # than in the DataLoader iterator's __del__, which may run at interpreter exit.
            if hasattr(it, "_shutdown_workers"):
                try:
                    it._shutdown_workers()
                except RuntimeError as exc:
                    # Seen with spawn only: a worker stopped mid-stream aborts in C++ teardown at exit
                    # ("terminate called without an active exception"). The data already delivered is unaffected.
                    log.debug("DataLoader worker shutdown: %s", exc)

    def _drain(self, it):
        pending_pad = 0
        last_good = None
        for b in it:
            self._consumed += 1
            for kind, key, shard, msg in b.errors:
                self.bad(kind, key, shard, msg)
            b.errors = []
            if len(b) == 0:  # every sample of this planned batch was bad
                pending_pad += 0 if self.train else 1
                continue
            last_good = b
            self._count(b)
            yield b
            while pending_pad and not self.train:  # keep the eval step count equal on every rank
                pending_pad -= 1
                yield self._as_padding(last_good)
        if pending_pad:
            if last_good is None:
                raise RuntimeError(
                    f"split {self.split!r}: no sample of this rank could be read ({dict(self.bad.counts)})")
            for _ in range(pending_pad):
                yield self._as_padding(last_good)

    def _as_padding(self, b: Batch) -> Batch:
        self._padding += 1
        return Batch(**{**b.__dict__, "is_padding": True})

    def _count(self, b: Batch) -> None:
        if b.is_padding:
            self._padding += 1
            return
        self._samples += len(b)
        for t in b.src_task.tolist():
            self._task_samples[self.tasks.names[t]] += 1

    # ---- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain-typed state (JSON / torch.save(weights_only) safe): restore it to continue exactly."""
        return {"version": _STATE_VERSION, "split": self.split, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                "num_workers": self.cfg.num_workers, "seed": self.cfg.seed, "batch_mode": self.cfg.batch_mode,
                "num_rows": len(self.meta), "consumed": self._consumed, "samples": self._samples,
                **self.bad.state(),
                "task_samples": dict(self._task_samples)}

    def load_state_dict(self, state: dict) -> None:
        require_same_plan(state, self.state_dict(),
                          ("split", "dp_rank", "dp_size", "num_workers", "seed", "batch_mode", "num_rows"), "batch")
        self._consumed, self._samples = int(state["consumed"]), int(state["samples"])
        self.bad.load(state)
        self._task_samples = Counter(state["task_samples"])

    def stats(self) -> dict:
        out = {"batches": self._consumed, "samples": self._samples, "padding_batches": self._padding,
               "errors": self.bad.nonzero(), "task_samples": dict(self._task_samples)}
        if self.missing_tasks:
            out["missing_tasks"] = list(self.missing_tasks)
        return out


def build_loader(cfg: DataConfig, split: str, dp_rank: int, dp_size: int, tokenizer, train: bool) -> StreamLoader:
    """The loader for `split` on data-parallel rank dp_rank of dp_size (pass them explicitly; see module doc).
    modality "lm": hs_scale.data.lm_loader.LMStreamLoader (packed LMBatch)."""
    if cfg.modality == "lm":
        from hs_scale.data.lm_loader import LMStreamLoader

        return LMStreamLoader(cfg, split, dp_rank, dp_size, tokenizer, train)
    return StreamLoader(cfg, split, dp_rank, dp_size, tokenizer, train)
