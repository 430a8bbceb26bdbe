"""Decoding metrics at each evaluation during training: WER (ASR) or BLEU (ST, MT) per task, or exact-match
accuracy on the synthetic task, on `train.eval_decode_utterances` utterances of each task of the eval split.

    decoder = DecodeEvaluator.build(cfg, engine, groups, split)  # None when off, or not possible on this layout
    metrics = decoder()   # {"wer": avg, "wer_per_task": {"de": ..., ...}, "decode_utterances": n, "decode_s": s}

Same numbers as `hs-scale evaluate --split <split> --beam B --max-len-b M --utterances-per-task N` on the
checkpoint saved at that step: the batches are evaluate's (`eval_inputs`: the split in the order one process
reads it; `first_utterances` keeps the first whole batches holding N utterances of each task), decoded by its
search and scored by its metrics (hs_scale.evaluation: `decode_batches`, `score_rows`).

Layouts:
  * one process: decodes every batch of the subset.
  * data parallel (megatron DDP, DeepSpeed ZeRO 0-2: every rank holds the full weights): batch i of the subset is
    decoded by dp rank i mod dp, so decoding takes 1/dp of the time; the rows are all-gathered over dp and
    scored once, in batch order. Each batch is decoded whole with the same weights as on one process, so the
    result is evaluate's (rank 0 alone would give the same numbers dp times slower).
  * tensor parallel (pp = 1): every TP rank of a dp rank runs the same search over the same batches; the
    vocab-parallel logits are all-gathered over TP at each step, so all ranks pick the same tokens and every TP
    rank takes part in each forward (its attention / FFN shards). Reductions across TP ranks add in another order
    than one process does: scores equal evaluate's to float rounding, not bitwise.
  * pipeline parallel: not done (an autoregressive search over pipeline stages would send one token per step
    through every stage); the trainer says so once at start and logs teacher-forced metrics only.
  * arch lm (decoder-only LM): no WER/BLEU; its evaluation reports perplexity.

Exact resume: decoding draws no random numbers (eval mode: dropout off, deterministic head selection), and the
RNG states (python, numpy, torch CPU and CUDA; a DataLoader's workers draw their base seed from torch's) are
restored afterwards anyway; the eval loader is its own object, so training batches are untouched.
"""

from __future__ import annotations

import contextlib
import random
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from hs_scale.evaluation.cli import auto_metric, eval_inputs
from hs_scale.evaluation.evaluate import decode_batches, first_utterances, score_rows
from hs_scale.evaluation.search import SearchConfig

# What the log calls each evaluate metric ("accuracy" is exact-sequence match; training's per-token one is
# "token_accuracy").
LOG_NAMES = {"wer": "wer", "bleu": "bleu", "accuracy": "sequence_accuracy"}


def skip_reason(cfg) -> str | None:
    """Why decoding metrics cannot run with `cfg` although train.eval_decode_utterances asks for them (None: they
    run, or are off)."""
    if not cfg.train.eval_decode_utterances or cfg.model.arch == "lm":
        return None
    if cfg.parallel.pipeline_parallel > 1:
        return (f"train.eval_decode_utterances: no WER/BLEU during training under pipeline parallelism "
                f"(parallel.pipeline_parallel={cfg.parallel.pipeline_parallel}); evaluation logs teacher-forced "
                "loss and perplexity, decode checkpoints with `hs-scale evaluate`")
    try:
        auto_metric(cfg)
    except ValueError as err:
        return f"train.eval_decode_utterances: no WER/BLEU during training: {err} (set data.target)"
    return None


@contextlib.contextmanager
def preserved_rng():
    """Restore python, numpy and torch (CPU and every CUDA device) RNG states on exit."""
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


class TensorParallelSearchModel(nn.Module):
    """The interface the search uses (config, encode, new_cache, decode -> logits_BLV) over a TP-sharded model
    chunk holding every layer (pp = 1). decode all-gathers this rank's vocab-parallel logit columns over TP and
    drops the padding columns, so every TP rank sees the full, identical [B, L, V] logits."""

    def __init__(self, chunk: nn.Module, tp_group):
        super().__init__()
        self.chunk = chunk  # registered: eval() / train() reach it (the search runs in eval mode)
        object.__setattr__(self, "stage", chunk.model)  # the sharded single-device model (not a second child)
        self.config, self.tp_group = chunk.model_config, tp_group

    def encode(self, *source):
        return self.stage.encode(*source)

    def new_cache(self):
        return self.stage.new_cache()

    def decode(self, decoder_input_BL, memory_BSD, memory_padding_mask_BS, tgt_task_B=None, cache=None):
        h_BLD = self.stage.decoder_states(decoder_input_BL, memory_BSD, memory_padding_mask_BS, tgt_task_B, cache)
        head = self.stage.lm_head or self.stage.decoder.embed_tokens
        local_BLVl = nn.functional.linear(h_BLD, head.weight).contiguous()
        parts = [torch.empty_like(local_BLVl) for _ in range(dist.get_world_size(self.tp_group))]
        dist.all_gather(parts, local_BLVl, group=self.tp_group)
        return torch.cat(parts, dim=-1)[..., : self.config.vocab_size]


class DecodeEvaluator:
    """Decodes this rank's share of the subset and returns the scores (same dict on every rank)."""

    def __init__(self, model: nn.Module, batches, tokenizer_decode, task_names: list[str], metric: str,
                 search: SearchConfig, utterances: int, device, dp_group=None):
        self.model, self.batches, self.tokenizer_decode = model, batches, tokenizer_decode
        self.task_names, self.metric, self.search, self.utterances = task_names, metric, search, utterances
        self.device, self.dp_group = device, dp_group
        self.dp_rank = dist.get_rank(dp_group) if dp_group is not None else 0
        self.dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1

    @classmethod
    def build(cls, cfg, engine, groups, split: str, task_names: list[str]) -> DecodeEvaluator | None:
        """The evaluator of this run, or None when decoding is off or impossible (see `skip_reason`)."""
        t = cfg.train
        if not t.eval_decode_utterances or cfg.model.arch == "lm" or skip_reason(cfg) is not None:
            return None
        batches, tokenizer_decode, metric = eval_inputs(cfg, split, "auto")
        if engine.staged:  # tp > 1, pp = 1 (skip_reason refused pp > 1): one chunk holding every layer
            (chunk,) = engine.modules
            model = TensorParallelSearchModel(chunk, groups.tp)
        else:  # replicated weights (one process, megatron DDP, ZeRO 0-2): the plain model
            model = engine.modules[0]
        dp_group = groups.dp if groups is not None and groups.dp_size > 1 else None
        search = SearchConfig(beam=t.eval_decode_beam, max_len_a=0.0, max_len_b=t.eval_decode_max_len)
        return cls(model, batches, tokenizer_decode, task_names, metric, search, t.eval_decode_utterances,
                   engine.device, dp_group)

    def _bf16_weights(self):
        """parallel.bf16 keeps bf16 weights: decode under bf16 autocast (close to evaluate's fp32, not bitwise)."""
        if next(self.model.parameters()).dtype != torch.bfloat16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=torch.bfloat16)

    def __call__(self) -> dict:
        """{"<metric>": macro average, "<metric>_per_task": {task: score}, "decode_utterances": n, "decode_s"}."""
        start = time.perf_counter()
        with preserved_rng(), torch.no_grad():
            subset = first_utterances(self.batches, self.utterances, "tgt_task")
            try:
                indexed = [(i, b) for i, b in enumerate(subset) if i % self.dp_size == self.dp_rank]
            finally:
                subset.close()  # stop the loader (and its workers) once the subset is read
            decoded = decode_batches(self.model, (b for _, b in indexed), self.tokenizer_decode, self.task_names,
                                     self.metric, self.search, device=self.device)
            with self._bf16_weights():
                mine = [(i, rows) for (i, _), rows in zip(indexed, decoded, strict=True)]
        if self.dp_group is not None:
            everyone: list = [None] * self.dp_size
            dist.all_gather_object(everyone, mine, group=self.dp_group)
            mine = sorted((item for rank_items in everyone for item in rank_items), key=lambda item: item[0])
        result = score_rows(self.metric, (row for _, rows in mine for row in rows), self.task_names)
        name = LOG_NAMES[self.metric]
        return {name: result["average"], f"{name}_per_task": result["scores"],
                "decode_utterances": result["total_sentences"], "decode_s": time.perf_counter() - start}


def summary_line(result: dict, split: str) -> str | None:
    """One line of the end-of-run summary with the last decoding scores, e.g.
    "dev WER per task (150 utterances): de 41.20  fr 39.85  es 44.10  average 41.72"; None without them."""
    for metric, name in LOG_NAMES.items():
        if name in result:
            scores = " ".join(f"{task} {score:.2f} " for task, score in result[f"{name}_per_task"].items())
            label = "exact-match accuracy" if metric == "accuracy" else metric.upper()
            return (f"{split} {label} per task ({result['decode_utterances']} utterances): {scores} "
                    f"average {result[name]:.2f}")
    return None
