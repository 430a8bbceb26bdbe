"""Spoken numbers, digit strings and dates per language: a bounded-vocabulary ASR domain for the demo.

The demo must end with a recogniser that works after a few CPU minutes, which a 2-hour corpus of open-vocabulary
UI strings cannot give (the first demo ended at WER 110%). Like TIDIGITS or the spoken-number subsets of speech
toolkits' recipes, this domain has a small vocabulary but real language differences, which is what head selection
is about: German says units before tens ("zweiundvierzig") and writes numbers as one compound word, French counts
in twenties above sixty ("quatre-vingt-dix-sept"), Spanish joins tens and units with "y"; month names and date
order differ too. The words come from maintained libraries, not hand-written tables: ``num2words`` (cardinals,
ordinals, years in 50+ languages) and Babel's CLDR month names.

Each row is one utterance: ``{"split", "lang", "tgt_lang", "domain", "text", "translation", "condition"}`` with
the transcript in ``text`` and the same utterance written in English in ``translation`` (for an ST target).
Rows are a pure function of (langs, sizes, seed); splits never share a (language, text) pair.
"""

from __future__ import annotations

import hashlib

import numpy as np

KINDS = ("digits", "number", "date")


def _words(n: int, lang: str, to: str = "cardinal") -> str:
    from num2words import num2words

    return num2words(n, lang=lang, to=to)


def _month(month: int, lang: str) -> str:
    from babel.dates import get_month_names

    return str(get_month_names("wide", locale=lang)[month]).lower()


def _date(day: int, month: int, year: int, lang: str) -> str:
    """A spoken date in the language's usual order ("der dritte März ...", "le trois mars ...", "tres de marzo de")."""
    y, m = _words(year, lang, "year"), _month(month, lang)
    if lang == "de":
        return f"der {_words(day, lang, 'ordinal')} {m} {y}"
    if lang == "fr":
        return f"le {'premier' if day == 1 else _words(day, lang)} {m} {y}"
    if lang in ("es", "pt"):
        return f"{_words(day, lang)} de {m} de {y}"
    if lang == "it":
        return f"il {'primo' if day == 1 else _words(day, lang)} {m} {y}"
    return f"{_words(day, lang)} {m} {y}"


def phrase(kind: str, lang: str, rng: np.random.Generator) -> tuple[str, str]:
    """(transcript in `lang`, the same phrase in English) for one random phrase of `kind`."""
    if kind == "digits":  # a phone-number-like digit string, read digit by digit
        digits = [int(d) for d in rng.integers(0, 10, size=int(rng.integers(3, 7)))]
        return " ".join(_words(d, lang) for d in digits), " ".join(_words(d, "en") for d in digits)
    if kind == "number":  # log-uniform over 0..99999: small numbers are as common as large ones
        n = int(10 ** rng.uniform(0, 5)) - 1
        return _words(n, lang), _words(n, "en")
    if kind == "date":
        day, month, year = int(rng.integers(1, 29)), int(rng.integers(1, 13)), int(rng.integers(1950, 2031))
        return _date(day, month, year, lang), _date(day, month, year, "en")
    raise ValueError(f"unknown phrase kind {kind!r}; use one of {KINDS}")


def _split_of(lang: str, text: str) -> str:
    """train/dev/test by a hash of the transcript: the same phrase never lands in two splits."""
    h = int.from_bytes(hashlib.sha1(f"{lang}:{text}".encode()).digest()[:4], "big") % 100
    return "test" if h < 5 else "dev" if h < 10 else "train"


def spoken_rows(langs: tuple[str, ...], sizes: dict[str, int], conditions: tuple[str, ...], seed: int = 0,
                lang_sizes: dict[str, float] | None = None) -> list[dict]:
    """Rows for `langs` with sizes[split] utterances per language (scaled by lang_sizes[lang], default 1).

    Phrases are drawn until every split of every language is full; acoustic conditions cycle per language, and the
    condition is the row's domain.
    """
    rows: list[dict] = []
    for li, lang in enumerate(langs):
        rng = np.random.default_rng([seed, li])
        want = {s: max(1, round(n * (lang_sizes or {}).get(lang, 1.0))) for s, n in sizes.items()}
        have = {s: 0 for s in sizes}
        for _ in range(50 * sum(want.values())):
            if all(have[s] >= want[s] for s in want):
                break
            text, english = phrase(KINDS[int(rng.integers(len(KINDS)))], lang, rng)
            split = _split_of(lang, text)
            if split not in want or have[split] >= want[split]:
                continue
            cond = conditions[sum(have.values()) % len(conditions)]
            rows.append(dict(split=split, lang=lang, tgt_lang=lang, domain=cond, text=text, translation=english,
                             condition=cond))
            have[split] += 1
        else:
            raise RuntimeError(f"{lang}: could not draw {want} distinct-enough phrases (got {have})")
    return rows
