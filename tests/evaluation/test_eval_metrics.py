"""WER / BLEU / accuracy against hand-computed values, normalisation across scripts, per-task macro average."""

from __future__ import annotations

import math

import pytest

from hs_scale.evaluation.metrics import bleu, normalize_for_wer, score_per_task, sequence_accuracy, wer


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Hello,   World!", "hello world"),
        ("L'homme est là.", "l homme est là"),  # fr: apostrophe splits, accents kept
        ("Straße, ÜBER alles?", "straße über alles"),  # de
        ("¿Qué tal? ¡Bien!", "qué tal bien"),  # es: inverted marks are punctuation too
        ("Это «тест», да?", "это тест да"),  # ru: guillemets
        ("Γεια σου, ΚΟΣΜΕ!", "γεια σου κοσμε"),  # el
        ("مرحبا، بالعالم؟", "مرحبا بالعالم"),  # ar: Arabic comma and question mark
        ("pi is 3.14 - ok", "pi is 3.14 ok"),  # a point between digits stays, a lone dash goes
        ("ｆｕｌｌｗｉｄｔｈ", "fullwidth"),  # NFKC
    ],
)
def test_normalisation(raw, expected):
    assert normalize_for_wer(raw) == expected


def test_wer_hand_computed():
    # ref "the cat sat on the mat" (6 words) vs hyp "the cat sit on mat": 1 substitution + 1 deletion.
    assert wer(["The cat sit on mat."], ["the cat sat on the mat"]) == pytest.approx(100 * 2 / 6)
    # Corpus level: errors and reference words are summed over sentences, not averaged per sentence.
    # s1: 0 errors / 2 words, s2: "a b c d" vs "a x": 1 sub + 2 del = 3 errors / 4 words -> 3 / 6.
    assert wer(["Hello, world!", "a x"], ["hello world", "a b c d"]) == pytest.approx(50.0)
    # An empty reference counts its hypothesis words as insertions.
    assert wer(["one two", "x"], ["", "x"]) == pytest.approx(200.0)
    assert wer([""], ["..."]) == 0.0
    assert math.isinf(wer(["word"], [""]))


def test_bleu_hand_computed():
    # Precisions 5/6, 3/5, 2/4, 1/3, brevity penalty 1: BLEU = (5/6 * 3/5 * 1/2 * 1/3) ** (1/4).
    score, signature = bleu(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert score == pytest.approx(100 * (5 / 6 * 3 / 5 * 1 / 2 * 1 / 3) ** 0.25, abs=1e-6)
    assert "tok:13a" in signature and "nrefs:1" in signature
    assert bleu(["a b c d e"], ["a b c d e"])[0] == pytest.approx(100.0)


def test_sequence_accuracy():
    assert sequence_accuracy([[1, 2], [3], []], [[1, 2], [3, 4], []]) == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="pair up"):
        sequence_accuracy([[1]], [])


def test_score_per_task_macro_average():
    hyps = {"de": ["a b c d"], "fr": ["x y", "z"]}
    refs = {"de": ["a b c d"], "fr": ["x q", "z"]}  # de 0 %, fr 1 error / 3 words
    out = score_per_task("wer", hyps, refs)
    assert out["scores"] == pytest.approx({"de": 0.0, "fr": 100 / 3})
    assert out["average"] == pytest.approx(50 / 3)  # unweighted over tasks, not pooled (which would be 1/7)
    assert out["num_sentences"] == {"de": 1, "fr": 2}
    assert out["signature"].startswith("wer|norm:")
    assert score_per_task("bleu", {"en": ["a b c d"]}, {"en": ["a b c d"]})["signature"].startswith("nrefs:1")
    with pytest.raises(ValueError, match="unknown"):
        score_per_task("cer", hyps, refs)
