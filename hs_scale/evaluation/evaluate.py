"""Decode a set of batches, score per task, report; and average checkpoints (the paper averages the last 10).

Legend: B batch, L target length.

    result = evaluate(model, batches, tokenizer.decode, task_names, "wer", beam=5)
    print(result["table"]); write_results(result, "eval.json")

`evaluate` is `decode_batches` (lazy, per batch) then `score_rows`; the trainer's decoding metrics
(hs_scale.training.decode_eval) call the two separately to decode a data-parallel shard per rank and score the
gathered rows once, so that they equal this function's result on the same batches.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from hs_scale.evaluation.metrics import HIGHER_IS_BETTER, METRICS, score_per_task
from hs_scale.evaluation.search import SearchConfig, generate


def reference_ids(target_BL: torch.Tensor, eos_id: int, pad_id: int) -> list[list[int]]:
    """Reference token ids per row: ``target`` up to its first </s> (pad and </s> removed)."""
    refs = []
    for row in target_BL.tolist():
        ids = []
        for t in row:
            if t == eos_id:
                break
            if t != pad_id:
                ids.append(t)
        refs.append(ids)
    return refs


def first_utterances(batches: Iterable, n: int, group_by: str = "tgt_task") -> Iterator:
    """The non-padding batches of ``batches``, in order, that hold an utterance of a task with fewer than ``n``
    so far: at least ``n`` utterances of every task (all of a task that has fewer), in whole batches, so each
    decodes exactly as in a full pass over the split (every batch when ``n`` is 0). Training's decoding metrics
    (``train.eval_decode_utterances``) and ``hs-scale evaluate --utterances-per-task`` select the same ones.

    Splits are stored task by task, so a plain "first N utterances" would hold one task. Reading stops once every
    task of the split (`split_tasks`; unknown: read to the end) has ``n``, and the loader is closed then.
    """
    wanted = split_tasks(batches, group_by) if n else None
    counts: Counter = Counter()
    it = iter(batches)
    try:
        for batch in it:
            if wanted is not None and all(counts[t] >= n for t in wanted):
                break
            if getattr(batch, "is_padding", False):
                continue
            tasks = getattr(batch, group_by).tolist()
            if n and all(counts[t] >= n for t in tasks):
                continue
            counts.update(tasks)
            yield batch
    finally:
        if hasattr(it, "close"):  # a loader's generator: shut its workers down now
            it.close()


def split_tasks(batches: Iterable, group_by: str = "tgt_task") -> set[int] | None:
    """Task ids (``group_by``) present in ``batches``: from a corpus loader's metadata, or from a list of
    batches; None when they cannot be known without reading everything."""
    meta = getattr(batches, "meta", None)
    if meta is not None and hasattr(meta, group_by):
        return set(getattr(meta, group_by).tolist())
    if isinstance(batches, (list, tuple)):
        return {t for b in batches if not getattr(b, "is_padding", False) for t in getattr(b, group_by).tolist()}
    return None


def decode_batches(
    model: torch.nn.Module,
    batches: Iterable,
    tokenizer_decode: Callable[[list[int]], str],
    task_names: list[str],
    metric: str,
    search: SearchConfig,
    *,
    group_by: str = "tgt_task",
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Iterator[list[tuple[str, str | None, Any, Any]]]:
    """Per non-padding batch, its rows' (task name, key, hypothesis, reference): detokenised text for wer/bleu,
    token ids for accuracy. Lazy: one batch is decoded per item taken."""
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    device = device if device is not None else next(model.parameters()).device
    bar = tqdm(desc="decoding", unit="utt", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for batch in batches:
            if getattr(batch, "is_padding", False):
                continue
            batch = batch.to(device)
            out = generate(model, batch, search)
            tasks = getattr(batch, group_by).tolist()
            batch_keys = list(getattr(batch, "keys", None) or [None] * len(tasks))
            rows = []
            for task, key, hyp, ref in zip(tasks, batch_keys, out.tokens, reference_ids(batch.target, eos, pad),
                                           strict=True):
                if metric != "accuracy":
                    hyp, ref = tokenizer_decode(hyp), tokenizer_decode(ref)
                rows.append((task_names[task], key, hyp, ref))
            bar.update(len(tasks))
            yield rows
    finally:
        bar.close()


def score_rows(metric: str, rows: Iterable[tuple[str, str | None, Any, Any]], task_names: list[str]) -> dict:
    """`score_per_task` of (task, key, hyp, ref) rows (from `decode_batches`), tasks in vocabulary order, plus
    "total_sentences" and the rows grouped per task under "_outputs" ({task: [(key, hyp, ref)]})."""
    grouped: dict[str, list] = {}
    for task, key, hyp, ref in rows:
        grouped.setdefault(task, []).append((key, hyp, ref))
    # Report tasks in vocabulary order, whatever order the batches came in.
    grouped = {n: grouped[n] for n in task_names if n in grouped}
    result = score_per_task(metric, {n: [h for _, h, _ in v] for n, v in grouped.items()},
                            {n: [r for _, _, r in v] for n, v in grouped.items()})
    result["total_sentences"] = sum(result["num_sentences"].values())
    result["_outputs"] = grouped
    return result


def evaluate(
    model: torch.nn.Module,
    batches: Iterable,
    tokenizer_decode: Callable[[list[int]], str],
    task_names: list[str],
    metric: str,
    beam: int = 5,
    *,
    max_len_a: float = 0.0,
    max_len_b: int = 200,
    length_penalty: float = 1.0,
    group_by: str = "tgt_task",
    device: torch.device | str | None = None,
    keep_outputs: bool = False,
    progress: bool = False,
) -> dict:
    """Decode every batch (greedy when beam == 1), score each task, macro-average.

    batches: objects with ``decoder_input`` (long [B, L], column 0 = start token), ``target`` (long [B, L],
        the reference ids then </s>), ``src_task`` / ``tgt_task`` (long [B]) and ``features`` + ``feature_lengths``
        (speech) or ``source_tokens`` (text), and ``.to(device)``. Batches with ``is_padding`` set (eval padding
        that keeps data-parallel ranks in step) are skipped.
    tokenizer_decode: token ids -> detokenised text (used for wer/bleu only).
    metric: "wer" | "bleu" | "accuracy" (exact match of token ids).
    group_by: "tgt_task" (per target language / domain: the decoder's task) or "src_task".
    Returns {"metric", "scores": {task: %}, "average", "num_sentences": {task: n}, "total_sentences",
    "signature", "search": {...}, "wall_s", "table"} and, with keep_outputs, "outputs": {task: [{key, hyp, ref}]}
    (key: the sample's manifest key, when batches carry ``keys``).
    progress: a tqdm bar on stderr over utterances decoded (rate and ETA when the batches have a length).
    """
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is unknown; use one of {METRICS}")
    if group_by not in ("tgt_task", "src_task"):
        raise ValueError(f"group_by={group_by!r}: use 'tgt_task' or 'src_task'")
    cfg = SearchConfig(beam=beam, max_len_a=max_len_a, max_len_b=max_len_b, length_penalty=length_penalty)
    start = time.perf_counter()
    decoded = decode_batches(model, batches, tokenizer_decode, task_names, metric, cfg, group_by=group_by,
                             device=device, progress=progress)
    result = score_rows(metric, (row for rows in decoded for row in rows), task_names)
    outputs = result.pop("_outputs")
    result["search"] = {
        "beam": beam,
        "max_len_a": max_len_a,
        "max_len_b": max_len_b,
        "length_penalty": length_penalty,
        "group_by": group_by,
    }
    result["wall_s"] = time.perf_counter() - start
    result["table"] = format_results(result)
    if keep_outputs:
        result["outputs"] = {n: [{"key": k, "hyp": h, "ref": r} for k, h, r in rows] for n, rows in outputs.items()}
    return result


def format_results(result: dict) -> str:
    """Text table: one row per task (score, sentences), then the macro average and the signature."""
    metric = result["metric"]
    arrow = "higher is better" if HIGHER_IS_BETTER[metric] else "lower is better"
    width = max([len("average")] + [len(n) for n in result["scores"]])
    lines = [f"{'task':<{width}}  {metric.upper():>8}  {'sentences':>9}"]
    for name, score in result["scores"].items():
        lines.append(f"{name:<{width}}  {score:>8.2f}  {result['num_sentences'][name]:>9}")
    lines.append(f"{'average':<{width}}  {result['average']:>8.2f}  {result.get('total_sentences', ''):>9}")
    lines.append(f"({metric}, {arrow}; average = unweighted mean over tasks)")
    if result.get("signature"):
        lines.append(f"signature: {result['signature']}")
    return "\n".join(lines)


def write_results(result: dict, path: str | Path) -> Path:
    """Write ``result`` as JSON (the table too, as one string); creates the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False, default=float) + "\n")
    return path


def average_checkpoints(state_dicts: list[dict]) -> dict:
    """Element-wise mean of the floating tensors of several state dicts of one model.

    The mean is accumulated in fp32 and cast back to each tensor's dtype (a bf16 model stays loadable as bf16).
    Non-floating entries (integer buffers such as the selectors' draw counters, bool masks, non-tensors) are taken
    from the last state dict: they count or index things, and a mean of counters is meaningless.
    Raises ValueError if the state dicts do not hold the same keys and shapes.
    """
    if not state_dicts:
        raise ValueError("average_checkpoints needs at least one state dict")
    keys = list(state_dicts[-1].keys())
    for i, sd in enumerate(state_dicts):
        if set(sd.keys()) != set(keys):
            diff = sorted(set(sd.keys()) ^ set(keys))[:5]
            raise ValueError(f"state dict {i} has different keys from the last one (e.g. {diff}); same model?")
    averaged = {}
    for key in keys:
        last = state_dicts[-1][key]
        if not (isinstance(last, torch.Tensor) and last.is_floating_point()):
            averaged[key] = last
            continue
        total = torch.zeros(last.shape, dtype=torch.float32, device=last.device)
        for i, sd in enumerate(state_dicts):
            t = sd[key]
            if not isinstance(t, torch.Tensor) or t.shape != last.shape:
                shape = getattr(t, "shape", type(t).__name__)
                raise ValueError(f"{key}: state dict {i} has {shape}, the last one {tuple(last.shape)}")
            total += t.to(device=last.device, dtype=torch.float32)
        averaged[key] = (total / len(state_dicts)).to(last.dtype)
    return averaged
