"""Evaluation: batched greedy/beam search, WER/BLEU/accuracy per task, checkpoint averaging, `hs-scale evaluate`.

    result = evaluate(model, batches, tokenizer.decode, task_names, "wer", beam=5)   # evaluate.py
    tokens = generate(model, batch, SearchConfig(beam=5)).tokens                      # search.py
"""

from hs_scale.evaluation.evaluate import average_checkpoints, evaluate, format_results, write_results
from hs_scale.evaluation.metrics import bleu, normalize_for_wer, score_per_task, sequence_accuracy, wer
from hs_scale.evaluation.search import SearchConfig, SearchOutput, beam_search, generate, greedy_search

__all__ = [
    "SearchConfig",
    "SearchOutput",
    "average_checkpoints",
    "beam_search",
    "bleu",
    "evaluate",
    "format_results",
    "generate",
    "greedy_search",
    "normalize_for_wer",
    "score_per_task",
    "sequence_accuracy",
    "wer",
    "write_results",
]
