"""Batch plans from metadata alone: which rows go into which batch, in which order, for each reader.

A *reader* is one DataLoader worker of one data-parallel rank: reader = dp_rank * W + worker, R = dp_size * W.
Plans depend only on the manifest, the config and the seed, never on decoded data, so:
- every tensor/pipeline rank of one data-parallel replica computes the same plan (same dp_rank);
- a resumed run replays the plan without decoding anything and continues exactly where it stopped.

Train plan (`train_pools`, infinite, the loader cycles): a *stream* is one (encoder task, decoder task) pair.
Each stream's shards are split over readers (shard i -> reader i % R; streams with fewer shards than readers
are split by row instead). Every reader draws streams with p ~ (n_s * w_s)^(1/T) (n_s = the stream's global
size), reads each stream shard by shard with a local shuffle, and cycles it when exhausted. Every `bucket_pool`
drawn samples (a pool) are sorted by length, cut into batches under the frame/token budgets (per stream in
homogeneous mode) and the batch order is shuffled.

Eval plan (finite): all rows of the split are sorted by length and cut; batch i goes to rank i % dp_size; ranks
with fewer batches get copies of other batches marked as padding, so every rank runs the same number of steps.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterator

import numpy as np

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Meta:
    """Per-row metadata of one split after filtering (arrays [N] unless noted)."""

    keys: list[str]
    shards: list[str]          # [num_shards] shard paths relative to the corpus dir
    shard_idx: np.ndarray      # int32 [N]
    src_len: np.ndarray        # int32 [N] frames (speech) or source tokens incl. EOS (text)
    tgt_len: np.ndarray        # int32 [N] target tokens incl. EOS
    stream: np.ndarray         # int32 [N] index into stream_names
    src_task: np.ndarray       # int64 [N] encoder task id
    tgt_task: np.ndarray       # int64 [N] decoder task id
    tgt_lang: list[str]        # [N]
    use_translation: np.ndarray  # bool [N]: target is the translation member (else the transcript)
    stream_names: list[str]
    crc: list[str] = dataclasses.field(default_factory=list)
    """[N] the manifest's per-member CRC-32 ("ext=xxxxxxxx ..."; "" = not checked)."""

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, keep: np.ndarray) -> Meta:
        """The rows where bool `keep` [N] is True (shards and stream names unchanged)."""
        idx = np.flatnonzero(keep)
        return dataclasses.replace(
            self, keys=[self.keys[i] for i in idx], shard_idx=self.shard_idx[idx], src_len=self.src_len[idx],
            tgt_len=self.tgt_len[idx], stream=self.stream[idx], src_task=self.src_task[idx],
            tgt_task=self.tgt_task[idx], tgt_lang=[self.tgt_lang[i] for i in idx],
            use_translation=self.use_translation[idx], crc=[self.crc[i] for i in idx] if self.crc else [])


def _seed(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) & 0xFFFFFFFF for p in parts])


def stream_probs(meta: Meta, temperature: float, weights: dict[str, float]) -> np.ndarray:
    """p_s ~ (n_s * w_s)^(1/T) over streams [S]. w_s looks up "<enc>-><dec>" then the encoder task name."""
    n = np.bincount(meta.stream, minlength=len(meta.stream_names)).astype(np.float64)
    w = np.array([weights.get(s, weights.get(s.split("->")[0], 1.0)) for s in meta.stream_names])
    p = (n * w) ** (1.0 / temperature)
    p[n == 0] = 0.0
    return p / p.sum()


def reader_rows(meta: Meta, reader: int, num_readers: int) -> dict[int, list[np.ndarray]]:
    """{stream: [row ids of one unit (a shard, or a row slice), in shard order]} owned by `reader`."""
    out: dict[int, list[np.ndarray]] = {}
    for s in range(len(meta.stream_names)):
        rows = np.flatnonzero(meta.stream == s)
        if len(rows) == 0:
            continue
        shard_ids = np.unique(meta.shard_idx[rows])
        if len(shard_ids) >= num_readers:
            units = [rows[meta.shard_idx[rows] == sh] for sh in shard_ids[reader::num_readers]]
        else:
            # NOTE: too few shards to give every reader its own: split rows instead (each reader then reads
            # 1/R of every shard of this stream). Rebuild with a smaller --shard-size to avoid it.
            units = [rows[reader::num_readers]] if len(rows) > reader else []
        units = [u for u in units if len(u)]
        if units:
            out[s] = units
    return out


def _cycle_stream(units: list[np.ndarray], window: int, seed: int, reader: int, stream: int) -> Iterator[int]:
    """Rows of one stream for one reader, forever: per epoch, units in a shuffled order, rows displaced by at
    most `window` positions (sort by position + U[0, window)), so reads stay near-sequential."""
    epoch = 0
    while True:
        rng = _seed(seed, 11, reader, stream, epoch)
        rows = np.concatenate([units[i] for i in rng.permutation(len(units))])
        if window > 0:
            rows = rows[np.argsort(np.arange(len(rows)) + rng.uniform(0, window, len(rows)), kind="stable")]
        yield from rows.tolist()
        epoch += 1


def cut_batches(rows: np.ndarray, meta: Meta, cfg, speech: bool) -> list[np.ndarray]:
    """Sort rows by length and cut greedily so each batch respects the padded-size budgets."""
    if len(rows) == 0:
        return []
    order = rows[np.lexsort((meta.tgt_len[rows], meta.src_len[rows]))]
    src_budget = cfg.max_frames_per_batch if speech else cfg.max_tokens_per_batch
    batches, start, max_s, max_t = [], 0, 0, 0
    for i, r in enumerate(order.tolist()):
        s, t = max(max_s, int(meta.src_len[r])), max(max_t, int(meta.tgt_len[r]) + 1)
        n = i - start + 1
        if n > 1 and (s * n > src_budget or t * n > cfg.max_tokens_per_batch or n > cfg.max_batch_size):
            batches.append(order[start:i])
            start, s, t = i, int(meta.src_len[r]), int(meta.tgt_len[r]) + 1
        max_s, max_t = s, t
    batches.append(order[start:])
    return batches


def train_pools(meta: Meta, cfg, reader: int, num_readers: int) -> Iterator[list[np.ndarray]]:
    """Infinite sequence of pools for one reader; a pool is its batches (row-id arrays) in the order they are
    used. The loader reads a pool's rows from the shards in shard order before cutting it (streaming)."""
    units = reader_rows(meta, reader, num_readers)
    if not units:
        raise RuntimeError(
            f"reader {reader} of {num_readers} (dp_rank x workers) has no training data: the split has only "
            f"{len(meta)} samples; use fewer workers/ranks or a larger corpus"
        )
    streams = sorted(units)
    p = stream_probs(meta, cfg.sampling_temperature, cfg.task_weights)[streams]
    p = p / p.sum()
    iters = [_cycle_stream(units[s], cfg.shuffle_window, cfg.seed, reader, s) for s in streams]
    rng = _seed(cfg.seed, 13, reader)
    speech = cfg.modality == "speech"
    # NOTE: a pool larger than the reader's data would hold the same row several times, and length sorting would
    # put the copies side by side in one batch.
    pool = max(1, min(cfg.bucket_pool, sum(len(u) for us in units.values() for u in us)))
    while True:
        choice = rng.choice(len(streams), size=pool, p=p)
        rows = np.fromiter((next(iters[c]) for c in choice.tolist()), dtype=np.int64, count=len(choice))
        if cfg.batch_mode == "homogeneous":
            batches = [b for s in np.unique(choice) for b in cut_batches(rows[choice == s], meta, cfg, speech)]
        else:
            batches = cut_batches(rows, meta, cfg, speech)
        yield [batches[i] for i in rng.permutation(len(batches)).tolist()]


def eval_plan(meta: Meta, cfg, dp_rank: int, dp_size: int) -> list[tuple[np.ndarray, bool]]:
    """This rank's eval batches as (row ids, is_padding); every rank gets the same count."""
    speech = cfg.modality == "speech"
    if cfg.batch_mode == "homogeneous":
        batches = [b for s in range(len(meta.stream_names))
                   for b in cut_batches(np.flatnonzero(meta.stream == s), meta, cfg, speech)]
    else:
        batches = cut_batches(np.arange(len(meta)), meta, cfg, speech)
    if not batches:
        return []
    per_rank = -(-len(batches) // dp_size)
    out = []
    for j in range(per_rank):
        i = j * dp_size + dp_rank
        # NOTE: padding batches are real batches (so shapes and collectives behave), flagged so that
        # metrics skip them; they only occur in the last step.
        out.append((batches[i], False) if i < len(batches) else (batches[i % len(batches)], True))
    return out


def require_same_plan(state: dict, mine: dict, keys: tuple[str, ...], plan: str) -> None:
    """Refuse a loader state whose `keys` differ from this loader's (`mine`): the `plan` ("batch", "packing")
    depends on them, so resuming across a difference would not continue exactly."""
    for k in keys:
        if state.get(k) != mine[k]:
            raise ValueError(f"loader state has {k}={state.get(k)!r} but this loader has {mine[k]!r}: exact resume "
                             f"needs the same {k} (the {plan} plan depends on it)")


class BadSamples:
    """The bad-sample policy and its count, shared by the loaders (`data.on_error`, docs/data.md).

    on_error "raise": the first bad sample stops the run with its kind, key, shard and message. "skip": it is
    dropped and counted once per (kind, key), however often a later epoch or a re-read meets it again; the first
    20 of each kind are logged as warnings, the rest at debug level (no log floods). `counts` (kind -> unique bad
    samples) and the set of seen (kind, key) are part of a loader's resume state.
    """

    def __init__(self, on_error: str, kinds, what: str = "sample"):
        self.on_error, self.what = on_error, what
        self.counts: Counter = Counter({k: 0 for k in kinds})
        self.seen: set[tuple[str, str]] = set()
        self.recent: list[tuple[str, str, str]] = []  # the last 100 (kind, key, shard)

    def __call__(self, kind: str, key: str, shard: str, msg: str) -> None:
        if self.on_error == "raise":
            raise RuntimeError(f"bad {self.what} (on_error=raise): {kind}: {self.what} {key!r} in shard {shard}: {msg}")
        if (kind, key) in self.seen:
            return
        self.seen.add((kind, key))
        self.counts[kind] += 1
        self.recent = (self.recent + [(kind, key, shard)])[-100:]
        level = logging.WARNING if self.counts[kind] <= 20 else logging.DEBUG
        log.log(level, "skipping bad %s: %s: %s in %s: %s", self.what, kind, key, shard, msg)

    def state(self) -> dict:
        return {"error_counts": dict(self.counts), "bad_samples": sorted([k, key] for k, key in self.seen)}

    def load(self, state: dict) -> None:
        self.counts = Counter(state["error_counts"])
        self.seen = {(k, key) for k, key in state.get("bad_samples", [])}

    def nonzero(self) -> dict:
        return {k: v for k, v in self.counts.items() if v}


class PlannedLoader:
    """What the planned loaders (hs_scale.data.loader.StreamLoader, hs_scale.data.lm_loader.LMStreamLoader) share:
    the rank check, the bad-sample count and the length of an eval plan. Subclasses set `train`, `bad`
    (BadSamples) and `_plan_len` (batches of this rank's eval plan; None when training)."""

    train: bool
    bad: BadSamples
    _plan_len: int | None

    @staticmethod
    def check_rank(dp_rank: int, dp_size: int) -> None:
        if not (isinstance(dp_size, int) and dp_size >= 1 and 0 <= dp_rank < dp_size):
            raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")

    @property
    def error_counts(self) -> Counter:
        """kind -> unique bad samples skipped so far (see BadSamples)."""
        return self.bad.counts

    def __len__(self) -> int:
        if self.train:
            raise TypeError("the train loader is infinite (it cycles); count steps instead")
        return self._plan_len
