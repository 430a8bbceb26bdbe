"""DataConfig: every knob of the streaming data pipeline, validated when built.

A plain dataclass of simple types so the top-level YAML config can hold it as its ``data:`` section.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from hs_scale.data import urls
from hs_scale.tasks import TASK_KEY_TYPES

ERROR_KINDS = ("truncated", "bad_audio", "bad_text", "empty_text", "too_long", "unknown_task", "nan_features",
               "checksum", "io_error")


@dataclass
class DataConfig:
    manifest: str = ""
    """The corpus: its manifest.parquet or the location that holds it (shard paths are relative to it). A local
    path, file://, http(s)://, s3:// or a pipe: command with '{}' for the relative path (hs_scale.data.urls)."""
    task_key: str = "lang"
    """How samples map to tasks (hs_scale.tasks): "lang", "domain" or "lang+domain". Encoder task from the
    source side, decoder task from the target side."""
    tasks: list[str] = field(default_factory=list)
    """Task names; their order gives the task ids (first axis of the selector logits). Empty = every task found
    in the manifest (all splits), sorted. Set it explicitly when a checkpoint must keep its ids."""
    modality: str = "speech"
    """"speech" (encoder input = filterbanks), "text" (encoder input = source tokens) or "lm" (decoder-only:
    documents packed into rows of `seq_len`, hs_scale.data.lm_loader, docs/lm_data.md)."""
    seq_len: int = 512
    """LM: tokens per packed row; a batch holds max_tokens_per_batch // seq_len rows."""
    target: str = "auto"
    """Decoder target: "auto" (translation when tgt_lang != lang, else the transcript), "transcript" (ASR even
    on an ST corpus; the decoder task then uses the source language) or "translation"."""
    tokenizer: str = ""
    """SentencePiece model path; empty = <corpus dir>/tokenizer.model (written by the builder)."""
    max_frames_per_batch: int = 40_000
    """Speech: budget on padded source frames per batch (B x T_max), 10 ms frames."""
    max_tokens_per_batch: int = 8_000
    """Budget on padded target tokens per batch (B x L_max); for text also on padded source tokens."""
    max_batch_size: int = 512
    """Hard cap on samples per batch, whatever the budgets allow."""
    max_source_frames: int = 3_000
    """Longer speech utterances (30 s at the default) are dropped as error kind "too_long"."""
    max_source_tokens: int = 256
    """Text: longer sources (tokens incl. EOS) are dropped as "too_long"."""
    max_target_tokens: int = 256
    """Longer targets (tokens incl. EOS) are dropped as "too_long"."""
    batch_mode: str = "mixed"
    """"mixed": a batch mixes tasks. "homogeneous": every batch holds one (encoder task, decoder task) pair, the
    fast path for head selection (one head gather per batch)."""
    sampling_temperature: float = 5.0
    """Train: a stream (encoder task -> decoder task pair) is drawn with p ~ (n * weight)^(1/T); T=1 follows the
    data, large T tends to uniform. Small streams are repeated (the train loader cycles)."""
    task_weights: dict[str, float] = field(default_factory=dict)
    """Optional per-stream multipliers on n before the temperature, keyed by encoder task name or by
    "<encoder task>-><decoder task>"; missing = 1."""
    bucket_pool: int = 2_000
    """Samples drawn before length bucketing: sorted by length, cut into batches, batch order shuffled."""
    shuffle_window: int = 500
    """Each stream is read shard by shard with rows displaced by at most this many positions (local shuffle)."""
    num_workers: int = 2
    """DataLoader worker processes per data-parallel rank (0 = load in the main process). Resume needs the same
    value. Shards are split over dp_size x max(1, num_workers) readers."""
    prefetch_factor: int = 4
    """Batches prefetched per worker."""
    worker_start_method: str = ""
    """"" (the platform default), "fork", "spawn" or "forkserver" for DataLoader workers."""
    precomputed_features: bool = False
    """Speech: read the shards' fp16 filterbanks (<key>.fbank.npy) instead of decoding FLAC."""
    cmvn: str = "global"
    """"global" (the builder's cmvn.json, applied by the model's first convolution so that exports fold it in),
    "utterance" (per utterance, in the loader) or "none"."""
    spec_augment: bool = True
    """SpecAugment masks on training batches (never when train=False)."""
    freq_masks: int = 2
    freq_mask_width: int = 27
    time_masks: int = 2
    time_mask_width: int = 40
    decoder_start: str = "lang_tag"
    """First decoder input token: "lang_tag" (<tgt_lang>) or "bos"."""
    on_error: str = "skip"
    """Bad samples (truncated member, undecodable audio, empty/over-long text, unknown task, NaN features, a
    member that fails its manifest checksum, a shard that cannot be streamed after `io_retries`):
    "skip" counts and logs them with their key and goes on; "raise" stops, naming shard and key."""
    on_missing_task: str = "raise"
    """Train split only, when every shard of one task (stream) is missing: "raise" refuses to start, naming the
    task; "warn" logs an error, drops that task from sampling and reports it in the loader's stats."""
    io_retries: int = 3
    """A shard stream that fails (dropped connection, HTTP error, truncated body) is re-opened and skipped to
    where it stopped this many times before its remaining samples count as bad ("io_error"/"truncated")."""
    io_timeout: float = 30.0
    """Seconds before a remote connect or read gives up (then it is retried)."""
    seed: int = 0
    """Seeds sampling, shuffling and SpecAugment; with the dp rank it fixes the batch sequence exactly."""

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"DataConfig.{msg}")

        choices = {"task_key": TASK_KEY_TYPES, "modality": ("speech", "text", "lm"), "target": ("auto", "transcript",
                   "translation"), "batch_mode": ("mixed", "homogeneous"), "cmvn": ("global", "utterance", "none"),
                   "decoder_start": ("lang_tag", "bos"), "on_error": ("skip", "raise"),
                   "on_missing_task": ("raise", "warn"),
                   "worker_start_method": ("", "fork", "spawn", "forkserver")}
        for name, allowed in choices.items():
            need(getattr(self, name) in allowed, f"{name}={getattr(self, name)!r}: use one of {list(allowed)}")
        need(isinstance(self.tasks, list) and all(isinstance(t, str) for t in self.tasks),
             f"tasks={self.tasks!r}: give a list of task names (strings), or [] to infer them")
        need(len(set(self.tasks)) == len(self.tasks), f"tasks has duplicates {self.tasks}: list each task once")
        for name in ("max_frames_per_batch", "max_tokens_per_batch", "max_batch_size", "max_source_frames",
                     "max_source_tokens", "max_target_tokens", "bucket_pool", "prefetch_factor"):
            need(int(getattr(self, name)) > 0, f"{name}={getattr(self, name)}: must be > 0")
        need(self.io_retries >= 0, f"io_retries={self.io_retries}: must be >= 0")
        need(self.io_timeout > 0, f"io_timeout={self.io_timeout}: must be > 0 seconds")
        need(self.shuffle_window >= 0, f"shuffle_window={self.shuffle_window}: must be >= 0 (0 = no shuffle)")
        need(self.num_workers >= 0, f"num_workers={self.num_workers}: must be >= 0 (0 = main process)")
        need(self.sampling_temperature > 0, f"sampling_temperature={self.sampling_temperature}: must be > 0 "
             "(1 = proportional to data size, larger = flatter)")
        need(all(float(w) > 0 for w in self.task_weights.values()),
             f"task_weights={self.task_weights}: weights must be > 0 (leave a task out for weight 1)")
        if self.modality == "speech":
            need(self.max_source_frames <= self.max_frames_per_batch,
                 f"max_source_frames={self.max_source_frames} exceeds max_frames_per_batch="
                 f"{self.max_frames_per_batch}: raise the batch budget or lower the utterance limit")
        need(self.modality == "lm" or self.max_target_tokens + 1 <= self.max_tokens_per_batch,
             f"max_target_tokens={self.max_target_tokens} does not fit max_tokens_per_batch="
             f"{self.max_tokens_per_batch}: raise the batch budget")
        need(not (self.modality != "speech" and self.precomputed_features),
             "precomputed_features=True needs modality='speech'")
        if self.modality == "lm":
            need(2 <= self.seq_len <= self.max_tokens_per_batch,
                 f"seq_len={self.seq_len}: must be >= 2 and <= max_tokens_per_batch={self.max_tokens_per_batch} "
                 "(a batch holds max_tokens_per_batch // seq_len rows)")

    @property
    def lm_rows_per_batch(self) -> int:
        """LM: packed rows per batch (B)."""
        return self.max_tokens_per_batch // self.seq_len

    @property
    def corpus_dir(self) -> str:
        """The corpus location (a directory path or a URL, see hs_scale.data.urls)."""
        if self._names_manifest_file():
            return urls.parent(self.manifest)
        return self.manifest

    @property
    def manifest_path(self) -> str:
        return self.manifest if self._names_manifest_file() else urls.join(self.manifest, "manifest.parquet")

    def _names_manifest_file(self) -> bool:
        path = urls.local_path(self.manifest)
        if path is not None and not self.manifest.startswith("file://"):
            return not os.path.isdir(path) and path.endswith(".parquet")
        return not self.manifest.startswith("pipe:") and self.manifest.rstrip("/").endswith(".parquet")

    def replace(self, **kw) -> DataConfig:
        return dataclasses.replace(self, **kw)
