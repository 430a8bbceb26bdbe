"""Corpus-level WER (jiwer), BLEU (sacrebleu) and sequence accuracy, per task and macro-averaged.

All scores are percentages. Per-task scores are corpus-level over that task's sentences (errors / reference words
for WER, one sacrebleu corpus score for BLEU); the average is the unweighted mean over tasks, as the paper averages
languages.

WER normalisation (fairseq's ``EvaluationTokenizer`` with lowercasing and punctuation removal, which is how the
paper's fairseq recipes score mTEDx/CoVoST ASR): NFKC, then sacrebleu's international tokenizer (``intl``: it
splits Unicode punctuation and symbols off words, so it works for de fr es it pt ru el ar alike), lowercase, drop
every token made only of punctuation characters (Unicode category P*), collapse whitespace. So "L'homme, là!"
becomes "l homme là" and "3.5" stays "3.5" (a point between digits is not split off).

BLEU is sacrebleu's default (13a tokenisation, mixed case, exp smoothing) on detokenised text; the signature string
goes into every report so that numbers stay comparable.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from functools import lru_cache
from importlib.metadata import version

import jiwer
from sacrebleu.metrics import BLEU

METRICS = ("wer", "bleu", "accuracy")
# Higher is better for BLEU and accuracy, lower for WER (used to describe tables and checkpoint choices).
HIGHER_IS_BETTER = {"wer": False, "bleu": True, "accuracy": True}


@lru_cache(maxsize=1)
def _intl_tokenizer():
    from sacrebleu.tokenizers.tokenizer_intl import TokenizerV14International

    return TokenizerV14International()


def _is_punctuation(token: str) -> bool:
    return all(unicodedata.category(c).startswith("P") for c in token)


def normalize_for_wer(text: str) -> str:
    """Lowercased, punctuation-free, single-spaced text (see the module docstring for the exact steps)."""
    text = unicodedata.normalize("NFKC", text)
    tokens = _intl_tokenizer()(text).lower().split()
    return " ".join(t for t in tokens if not _is_punctuation(t))


def wer(hypotheses: Sequence[str], references: Sequence[str], normalize: bool = True) -> float:
    """Corpus WER in percent: 100 * (S + D + I) / reference words, after ``normalize_for_wer``.

    A reference that is empty after normalisation counts its hypothesis words as insertions; if every reference
    is empty the WER is 0 when every hypothesis is empty too, else inf.
    """
    _check_pairs(hypotheses, references)
    if normalize:
        hypotheses = [normalize_for_wer(h) for h in hypotheses]
        references = [normalize_for_wer(r) for r in references]
    ref_words = sum(len(r.split()) for r in references)
    if ref_words == 0:
        return 0.0 if all(not h.split() for h in hypotheses) else math.inf
    out = jiwer.process_words(list(references), list(hypotheses))
    return 100.0 * (out.substitutions + out.deletions + out.insertions) / ref_words


def bleu(hypotheses: Sequence[str], references: Sequence[str], tokenize: str | None = None) -> tuple[float, str]:
    """(corpus BLEU, sacrebleu signature string) with one reference per hypothesis."""
    _check_pairs(hypotheses, references)
    metric = BLEU(tokenize=tokenize)
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return float(score.score), str(metric.get_signature())


def sequence_accuracy(hypotheses: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> float:
    """Percent of hypotheses whose token ids equal the reference exactly."""
    _check_pairs(hypotheses, references)
    if not references:
        return 0.0
    return 100.0 * sum(list(h) == list(r) for h, r in zip(hypotheses, references, strict=True)) / len(references)


def score_per_task(
    metric: str,
    hypotheses: dict[str, list],
    references: dict[str, list],
) -> dict:
    """Scores of each task's corpus and their macro average.

    hypotheses / references: task name -> list of strings (wer, bleu) or token-id lists (accuracy).
    Returns {"metric", "scores": {task: float}, "average": float, "num_sentences": {task: int},
    "signature": str | None}.
    """
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is unknown; use one of {METRICS}")
    if set(hypotheses) != set(references):
        raise ValueError(f"tasks differ between hypotheses {sorted(hypotheses)} and references {sorted(references)}")
    scores, counts, signature = {}, {}, None
    for task in hypotheses:
        hyps, refs = hypotheses[task], references[task]
        counts[task] = len(refs)
        if metric == "wer":
            scores[task] = wer(hyps, refs)
        elif metric == "bleu":
            scores[task], signature = bleu(hyps, refs)
        else:
            scores[task] = sequence_accuracy(hyps, refs)
    if metric == "wer":
        signature = f"wer|norm:nfkc+intl+lc+nopunct|jiwer:{version('jiwer')}"
    average = sum(scores.values()) / len(scores) if scores else math.nan
    return {"metric": metric, "scores": scores, "average": average, "num_sentences": counts, "signature": signature}


def _check_pairs(hypotheses: Sequence, references: Sequence) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references; they must pair up")
