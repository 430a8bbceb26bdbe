"""Document packing for decoder-only LMs: a stream of documents -> fixed-length rows [B, L] -> LMBatch.

Legend: B rows per batch, L = seq_len tokens per row, S segments (document pieces) in a batch.

A document is ``[BOS] + tokens + [EOS]`` (n tokens). Packing is greedy and in stream order: each row is filled
from where the previous row stopped; a document that does not fit in what is left of a row is **split and
continued** at the start of the next row (nothing is truncated or dropped). Each piece of a document in a row is a
*segment*:

- ``position_ids`` restart at 0 in every segment (a continued piece starts at 0 again: with RoPE only relative
  positions matter inside a segment, and the piece cannot attend to its earlier part in the previous row anyway);
- ``doc_ids`` number the segments of a row 0, 1, 2, ...; attention is causal within a segment only
  (per-document masking; `LMBatch.cu_seqlens` gives the varlen boundaries);
- ``targets[p]`` is the document's next token, also across a row cut (the first token of the continuation is the
  last target of the row before, so every token but a document's BOS is a target exactly once); at the last token
  of a document (its EOS) the target is IGNORE_INDEX: no token predicts across documents;
- ``task_ids`` carry each token's document's task id (its language): a row may mix languages and every token
  selects its own document's heads.

Every token of every document is an input exactly once. Only the end of a finite stream (evaluation) pads: pad_id
inputs, IGNORE_INDEX targets, its own segment, the last document's task id.

The plan (which pieces go in which row) is a pure function of the document lengths (`pack_pieces`), so a loader
can fast-forward it to any batch without reading a document: that is what makes resume exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Piece:
    """Tokens [start, stop) of the document at position `doc` of the packing stream."""

    doc: int
    start: int
    stop: int


def pack_pieces(lengths: Iterable[int], seq_len: int) -> Iterator[list[Piece]]:
    """Rows of pieces from document token lengths (in stream order; may be infinite). Every row but the last of
    a finite stream holds exactly `seq_len` tokens. Document i is `Piece.doc == i`."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len}: must be >= 1")
    row: list[Piece] = []
    free = seq_len
    for doc, n in enumerate(lengths):
        if n < 1:
            raise ValueError(f"document {doc} of the packing stream has {n} tokens; every document has >= 1")
        start = 0
        while start < n:
            take = min(free, n - start)
            row.append(Piece(doc, start, start + take))
            start += take
            free -= take
            if free == 0:
                yield row
                row, free = [], seq_len
    if row:
        yield row


@dataclass
class LMBatch:
    """A packed LM batch (see the module docstring for the semantics). Tensors are long [B, L] unless noted."""

    input_ids: torch.Tensor
    """Token ids [B, L] (pad_id only in the padding at the end of a finite stream)."""
    targets: torch.Tensor
    """Next token of the same document [B, L], IGNORE_INDEX at document ends and padding."""
    position_ids: torch.Tensor
    """Position within the segment [B, L], restarting at 0 per segment."""
    doc_ids: torch.Tensor
    """Segment index within the row [B, L] (0, 1, ...); attention must not cross a change of doc id."""
    task_ids: torch.Tensor
    """Task id (hs_scale.tasks.TaskVocab; the document's language for task_key "lang") per token [B, L]."""
    keys: list[str] = field(default_factory=list)
    """Manifest keys of the documents with a piece in this batch, in packing order (a split one appears in every
    batch it has a piece in)."""
    is_padding: bool = False
    """Eval only: a repeated batch that keeps every rank's step count equal; exclude it from metrics."""
    reader: int = -1
    """Logical reader (worker) that produced it; with `plan_index`, what the loader's resume state counts."""
    plan_index: int = -1
    errors: list = field(default_factory=list)
    """(kind, key, shard, message) of documents that could not be read (their tokens became padding)."""

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        """Tokens with a target (the loss normaliser)."""
        return int((self.targets != IGNORE_INDEX).sum())

    def task_token_counts(self, num_tasks: int) -> torch.Tensor:
        """long [num_tasks]: tokens with a target per task."""
        valid = self.targets != IGNORE_INDEX
        return torch.bincount(self.task_ids[valid], minlength=num_tasks)

    def cu_seqlens(self) -> tuple[torch.Tensor, int]:
        """(int32 [S + 1] cumulative segment lengths over the flattened B*L tokens, longest segment): the
        boundaries a varlen attention kernel (flash-attn varlen) takes."""
        B, L = self.doc_ids.shape
        starts = torch.ones(B, L, dtype=torch.bool, device=self.doc_ids.device)
        starts[:, 1:] = self.doc_ids[:, 1:] != self.doc_ids[:, :-1]
        idx = torch.nonzero(starts.flatten(), as_tuple=False).flatten()
        cu = torch.cat([idx, idx.new_tensor([B * L])]).to(torch.int32)
        return cu, int((cu[1:] - cu[:-1]).max()) if len(cu) > 1 else 0

    def to(self, device, non_blocking: bool = False) -> LMBatch:
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device, non_blocking=non_blocking)
        return LMBatch(**moved)

    def pin_memory(self) -> LMBatch:
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.pin_memory()
        return LMBatch(**moved)


def fill_rows(rows: list[list[Piece]], docs: dict[int, tuple[np.ndarray, int] | None], seq_len: int, pad_id: int,
              keys: dict[int, str] | None = None) -> LMBatch:
    """Materialise planned rows. docs: {stream position: (token ids [n] incl. BOS/EOS, task id), or None for a
    document that could not be read (its planned tokens become padding, so the plan and resume stay exact)}."""
    B = len(rows)
    ids = np.full((B, seq_len), pad_id, np.int64)
    tgt = np.full((B, seq_len), IGNORE_INDEX, np.int64)
    pos = np.zeros((B, seq_len), np.int64)
    seg = np.zeros((B, seq_len), np.int64)
    task = np.zeros((B, seq_len), np.int64)
    order: list[str] = []
    last_task = 0
    for b, row in enumerate(rows):
        p = 0
        for s, pc in enumerate(row):
            n = pc.stop - pc.start
            seg[b, p : p + n] = s
            pos[b, p : p + n] = np.arange(n)
            doc = docs[pc.doc]
            if doc is not None:
                toks, t = doc
                ids[b, p : p + n] = toks[pc.start : pc.stop]
                nxt = toks[pc.start + 1 : pc.stop + 1]  # next tokens; one short when the piece ends the document
                tgt[b, p : p + len(nxt)] = nxt
                task[b, p : p + n] = last_task = t
            else:
                task[b, p : p + n] = last_task
            if keys is not None and (not order or order[-1] != keys[pc.doc]):
                order.append(keys[pc.doc])
            p += n
        if p < seq_len:  # the end of a finite stream: one padding segment
            seg[b, p:] = len(row)
            pos[b, p:] = np.arange(seq_len - p)
            task[b, p:] = last_task
    return LMBatch(input_ids=torch.from_numpy(ids), targets=torch.from_numpy(tgt), position_ids=torch.from_numpy(pos),
                   doc_ids=torch.from_numpy(seg), task_ids=torch.from_numpy(task), keys=order)
