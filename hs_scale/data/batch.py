"""The Batch the trainer consumes, and collation of decoded samples into it.

Legend: B batch, T source frames, S source tokens, L target length (+1 for the start/EOS shift).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Batch:
    keys: list[str]
    """Sample keys [B] (manifest `key`)."""
    decoder_input: torch.Tensor
    """long [B, L]: start token (<tgt_lang> tag or BOS), then the target tokens, padded with pad_id."""
    target: torch.Tensor
    """long [B, L]: decoder_input shifted left: the target tokens then EOS, padded with pad_id."""
    target_lengths: torch.Tensor
    """long [B]: non-pad positions of `target` (tokens + EOS)."""
    src_task: torch.Tensor
    """long [B]: encoder task id (hs_scale.tasks.TaskVocab over DataConfig.tasks), from the source side."""
    tgt_task: torch.Tensor
    """long [B]: decoder task id, from the target side."""
    num_target_tokens: int
    """Sum of target_lengths (for per-token loss normalisation)."""
    features: torch.Tensor | None = None
    """Speech: float32 [B, T, 80] log-mel filterbanks, zero-padded (raw for data.cmvn global: the model normalises)."""
    feature_lengths: torch.Tensor | None = None
    """Speech: long [B] valid frames per sample."""
    source_tokens: torch.Tensor | None = None
    """Text: long [B, S] source tokens + EOS, padded with pad_id."""
    source_lengths: torch.Tensor | None = None
    """Text: long [B]."""
    tgt_lang: list[str] = field(default_factory=list)
    """Target language per sample [B] (for decoding with a forced language tag)."""
    is_padding: bool = False
    """Eval only: a repeated batch that keeps every rank's step count equal; exclude it from metrics."""
    reader: int = -1
    """Logical reader (worker) that produced it; with `plan_index`, what the loader's resume state counts."""
    plan_index: int = -1
    errors: list = field(default_factory=list)
    """(kind, key, shard, message) of samples dropped while this batch was made (aggregated by the loader)."""

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def homogeneous(self) -> bool:
        """True when every sample has the same (encoder task, decoder task): one head selection per batch."""
        return bool((self.src_task == self.src_task[0]).all() and (self.tgt_task == self.tgt_task[0]).all())

    def to(self, device, non_blocking: bool = False) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device, non_blocking=non_blocking)
        return Batch(**moved)

    def pin_memory(self) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.pin_memory()
        return Batch(**moved)


def empty_batch(reader: int, plan_index: int, errors: list) -> Batch:
    """Marker for a planned batch whose samples were all bad: keeps the resume count, never reaches the trainer."""
    z = torch.zeros(0, dtype=torch.long)
    return Batch(keys=[], decoder_input=z.view(0, 0), target=z.view(0, 0), target_lengths=z, src_task=z,
                 tgt_task=z, num_target_tokens=0, reader=reader, plan_index=plan_index, errors=errors)


def pad_ids(seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """list of B id lists -> long [B, max_len] padded with pad_id."""
    out = np.full((len(seqs), max(len(s) for s in seqs)), pad_id, np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return torch.from_numpy(out)


def collate(samples: list[dict], tokenizer, decoder_start: str) -> Batch:
    """samples: dicts with key, tgt_ids (no EOS), tgt_lang, src_task, tgt_task, and feats float32 [T, 80] or
    src_ids (with EOS). Returns a Batch."""
    pad, eos = tokenizer.pad_id, tokenizer.eos_id
    starts = [tokenizer.lang_tag_id(s["tgt_lang"]) if decoder_start == "lang_tag" else tokenizer.bos_id
              for s in samples]
    dec_in = pad_ids([[st] + s["tgt_ids"] for st, s in zip(starts, samples, strict=True)], pad)
    tgt = pad_ids([s["tgt_ids"] + [eos] for s in samples], pad)
    tgt_len = torch.tensor([len(s["tgt_ids"]) + 1 for s in samples], dtype=torch.long)
    b = Batch(
        keys=[s["key"] for s in samples], decoder_input=dec_in, target=tgt, target_lengths=tgt_len,
        src_task=torch.tensor([s["src_task"] for s in samples], dtype=torch.long),
        tgt_task=torch.tensor([s["tgt_task"] for s in samples], dtype=torch.long),
        num_target_tokens=int(tgt_len.sum()), tgt_lang=[s["tgt_lang"] for s in samples],
    )
    if "feats" in samples[0]:
        lens = [len(s["feats"]) for s in samples]
        x = np.zeros((len(samples), max(lens), samples[0]["feats"].shape[1]), np.float32)
        for i, s in enumerate(samples):
            x[i, : lens[i]] = s["feats"]
        b.features = torch.from_numpy(x)
        b.feature_lengths = torch.tensor(lens, dtype=torch.long)
    else:
        b.source_tokens = pad_ids([s["src_ids"] for s in samples], pad)
        b.source_lengths = torch.tensor([len(s["src_ids"]) for s in samples], dtype=torch.long)
    return b
