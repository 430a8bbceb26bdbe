"""Where the trainer's batches come from: a sharded corpus (hs_scale.data) or the built-in synthetic task.

Both give each data-parallel rank its own micro-batches, evaluation batches, and a plain-typed state for exact
resume (the corpus loader's shard cursors; the synthetic task is a pure function of the step).
"""

from __future__ import annotations

from hs_scale.data import build_loader, load_tokenizer, urls
from hs_scale.data.config import DataConfig
from hs_scale.data.manifest import read_manifest
from hs_scale.data.synthetic import PAD, SyntheticConfig, SyntheticTask


class SyntheticSource:
    def __init__(self, cfg: SyntheticConfig, dp_rank: int, dp_size: int, grad_accum: int):
        self.task, self.cfg = SyntheticTask(cfg), cfg
        self.dp_rank, self.dp_size, self.grad_accum = dp_rank, dp_size, grad_accum
        self.task_names, self.pad_id = cfg.task_names, PAD
        self.step = 0
        self.tokenizer = None

    def next_microbatches(self) -> list:
        first = self.step * self.grad_accum
        self.step += 1
        return [self.task.batch((first + m) * self.dp_size + self.dp_rank) for m in range(self.grad_accum)]

    def eval_batches(self) -> list:
        """This rank's share of the fixed validation set (every task, `eval_batches` batches each)."""
        K = len(self.cfg.rules)
        all_batches = [(i * K + k, k) for k in range(K) for i in range(self.cfg.eval_batches)]
        mine = all_batches[self.dp_rank :: self.dp_size]
        return [self.task.batch(index, "valid", task=k) for index, k in mine]

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])

    def stats(self) -> dict:
        """Nothing to report: the synthetic task has no files and no bad samples."""
        return {}


class CorpusSource:
    def __init__(self, cfg: DataConfig, dp_rank: int, dp_size: int, grad_accum: int, eval_split: str = "dev"):
        # The manifest first: a wrong data.manifest should say the corpus is missing, not that its tokenizer is.
        read_manifest(cfg.manifest_path, ["split"])
        self.tokenizer = load_tokenizer(cfg.tokenizer or urls.join(cfg.corpus_dir, "tokenizer.model"))
        self.cfg, self.dp_rank, self.dp_size, self.grad_accum = cfg, dp_rank, dp_size, grad_accum
        self.loader = build_loader(cfg, "train", dp_rank, dp_size, self.tokenizer, train=True)
        self.task_names, self.pad_id = self.loader.tasks.names, self.tokenizer.pad_id
        self.eval_split = eval_split
        self._iter = None
        self._eval_loader = None

    def next_microbatches(self) -> list:
        if self._iter is None:
            self._iter = iter(self.loader)
        return [next(self._iter) for _ in range(self.grad_accum)]

    def eval_batches(self):
        """Iterable over this rank's share of the eval split (padding batches keep ranks in step). Its bad samples
        are reported by `stats()` (the latest evaluation's)."""
        self._eval_loader = build_loader(self.cfg, self.eval_split, self.dp_rank, self.dp_size, self.tokenizer,
                                         train=False)
        return self._eval_loader

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._iter = None  # the next iteration starts from the restored cursor

    def stats(self) -> dict:
        """The train loader's stats, with `errors` as unique bad samples per split and kind:
        {"train": {kind: n}, "<eval split>": {kind: n}} (this rank's share)."""
        out = self.loader.stats()
        out["errors"] = {"train": out["errors"]}
        if self._eval_loader is not None:
            out["errors"][self.eval_split] = self._eval_loader.stats()["errors"]
        return out


def build_source(data: DataConfig | None, synthetic: SyntheticConfig | None, dp_rank: int, dp_size: int,
                 grad_accum: int):
    if synthetic is not None:
        return SyntheticSource(synthetic, dp_rank, dp_size, grad_accum)
    return CorpusSource(data, dp_rank, dp_size, grad_accum)
