"""A built-in synthetic multilingual task: each "language" is a different rule over the same symbols.

Why this task: the rules conflict (copy vs reverse vs shift ...), so one set of shared heads must serve
contradictory alignments, and the encoder never sees which language a sample belongs to - the task reaches the
encoder only through head selection, as in ASR/ST where the source language is not in the input (see
shared docs/data.md, "when does selection help"). The decoder starts from a target-language tag, as a real
multilingual decoder does.

Token ids: 0 <s>, 1 <pad>, 2 </s>, 3 <unk>, then one tag per task, then the symbols.
Batches are a pure function of (seed, split, step), so a resumed run sees exactly the same data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from hs_scale.data.batch import Batch

BOS, PAD, EOS, UNK = 0, 1, 2, 3
NUM_SPECIAL = 4


def _shift(x: Tensor, n: int) -> Tensor:
    return (x + 1) % n


def _swap_pairs(x: Tensor) -> Tensor:
    y = x.clone()
    even = (len(x) // 2) * 2
    y[0:even:2], y[1:even:2] = x[1:even:2], x[0:even:2]
    return y


RULES = {
    "copy": lambda x, n: x,
    "reverse": lambda x, n: x.flip(0),
    "shift": _shift,
    "swap_pairs": lambda x, n: _swap_pairs(x),
    "rotate": lambda x, n: x.roll(-1),
    "reverse_shift": lambda x, n: _shift(x.flip(0), n),
}


@dataclass
class SyntheticConfig:
    rules: list[str] = field(default_factory=lambda: ["copy", "reverse", "shift", "swap_pairs"])
    """One task ("language") per rule, in task-id order. Known rules: copy, reverse, shift, swap_pairs, rotate,
    reverse_shift."""

    num_symbols: int = 16
    """Alphabet size shared by every task."""

    min_len: int = 4
    """Shortest source sequence."""

    max_len: int = 10
    """Longest source sequence."""

    batch_size: int = 64
    """Sequences per training batch."""

    homogeneous_batches: bool = False
    """True: every batch holds one task (the fast selection path); False: tasks mixed within a batch."""

    eval_batches: int = 4
    """Held-out batches per task at evaluation."""

    seed: int = 0
    """Seed of the data (independent of the model seed)."""

    def __post_init__(self) -> None:
        unknown = [r for r in self.rules if r not in RULES]
        if unknown:
            raise ValueError(f"synthetic.rules: unknown rule(s) {unknown}; use some of {sorted(RULES)}")
        if not self.rules or len(set(self.rules)) != len(self.rules):
            raise ValueError("synthetic.rules must list distinct rules, at least one")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError("synthetic.min_len and max_len must satisfy 1 <= min_len <= max_len")
        if self.num_symbols < 2 or self.batch_size < 1 or self.eval_batches < 1:
            raise ValueError("synthetic.num_symbols >= 2, batch_size >= 1 and eval_batches >= 1 are required")

    @property
    def task_names(self) -> list[str]:
        return list(self.rules)

    @property
    def vocab_size(self) -> int:
        return NUM_SPECIAL + len(self.rules) + self.num_symbols


class SyntheticTask:
    """Generates batches of the synthetic task; `batch(step)` is deterministic."""

    _SPLIT_SALT = {"train": 0, "valid": 1_000_003}

    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg
        self.symbol_offset = NUM_SPECIAL + len(cfg.rules)

    def tag(self, task: int) -> int:
        return NUM_SPECIAL + task

    def batch(self, step: int, split: str = "train", task: int | None = None) -> Batch:
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + self._SPLIT_SALT[split] + step)
        B = cfg.batch_size
        if task is not None:
            tasks = torch.full((B,), task, dtype=torch.long)
        elif cfg.homogeneous_batches:
            tasks = torch.full((B,), int(torch.randint(len(cfg.rules), (1,), generator=gen)), dtype=torch.long)
        else:
            tasks = torch.randint(len(cfg.rules), (B,), generator=gen)
        lengths = torch.randint(cfg.min_len, cfg.max_len + 1, (B,), generator=gen)
        S = int(lengths.max())
        source = torch.full((B, S), PAD, dtype=torch.long)
        dec_in = torch.full((B, S + 1), PAD, dtype=torch.long)
        target = torch.full((B, S + 1), PAD, dtype=torch.long)
        for b in range(B):
            n = int(lengths[b])
            x = torch.randint(cfg.num_symbols, (n,), generator=gen)
            y = RULES[cfg.rules[int(tasks[b])]](x, cfg.num_symbols)
            source[b, :n] = x + self.symbol_offset
            dec_in[b, 0] = self.tag(int(tasks[b]))
            dec_in[b, 1 : n + 1] = y + self.symbol_offset
            target[b, :n] = y + self.symbol_offset
            target[b, n] = EOS
        target_lengths = lengths + 1
        return Batch(keys=[f"{split}-{step}-{b}" for b in range(B)], decoder_input=dec_in, target=target,
                     target_lengths=target_lengths, src_task=tasks, tgt_task=tasks.clone(),
                     num_target_tokens=int(target_lengths.sum()), source_tokens=source, source_lengths=lengths)
