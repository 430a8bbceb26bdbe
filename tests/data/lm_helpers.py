"""Test helpers for the LM corpus: a small help tree in the layout of Debian's libreoffice-help-XX packages
(usr/share/libreoffice/help/<lang>/text/.../*.html, paragraphs with XHP ids), and a corpus built from it."""

from __future__ import annotations

import os
import random

# Letters per language: documents of different languages share no words, as real translations mostly do not.
ALPHABETS = {"en": "abcdefghiklmnoprstuw", "de": "äöüßbdfghklmnrstz", "hi": "कखगघचजटडतदनपबमयरलवसह"}
NUM_PAGES = 24


def _words(rng: random.Random, letters: str, n: int) -> str:
    return " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(n))


def page_paragraphs(seed: int = 0) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """{page: {lang: [(paragraph id, text)]}}. Hindi leaves every third paragraph in English (a fallback, which
    the recipe must drop), the first one as an older English wording (a different word order)."""
    rng = random.Random(seed)
    pages = {}
    for p in range(NUM_PAGES):
        page = f"text/s{'calc' if p % 2 else 'writer'}/0{p % 3}/page{p:03d}.html"
        n = rng.randint(3, 6)
        en = [(f"par_id{p}{k}", _words(rng, ALPHABETS["en"], rng.randint(4, 14))) for k in range(n)]
        de = [(pid, _words(rng, ALPHABETS["de"], rng.randint(4, 14))) for pid, _ in en]
        hi = [(pid, _words(rng, ALPHABETS["hi"], rng.randint(4, 14))) for pid, _ in en]
        for k in range(0, n, 3):
            text = en[k][1] if k else " ".join(reversed(en[k][1].split()))
            hi[k] = (en[k][0], text)
        pages[page] = {"en-US": en, "de": de, "hi": hi}
    return pages


def write_help_tree(root: str, seed: int = 0) -> dict:
    """Write the tree under root; returns page_paragraphs(seed)."""
    pages = page_paragraphs(seed)
    for page, langs in pages.items():
        for lang, paras in langs.items():
            path = os.path.join(root, "usr/share/libreoffice/help", lang, page)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            body = "\n".join(f'<p id="{pid}" class="paragraph" dir="auto">{t}</p>' for pid, t in paras)
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(f'<!DOCTYPE html>\n<html lang="{lang}"><head><title>t</title></head><body>'
                         f'<header><p dir="auto">Help for LibreOffice</p></header>'
                         f'<div id="DisplayArea">{body}</div></body></html>')
    return pages


def build_tiny_lm_corpus(tmp: str, **kw) -> str:
    """A corpus built by the lm_help recipe from the tree (no apt); returns its dir."""
    from data_pipelines.lm_corpus import build_lm_corpus

    root = os.path.join(tmp, "helptree")
    write_help_tree(root)
    out = os.path.join(tmp, "lm")
    kw = {"langs": ("en", "de", "hi"), "min_chars": 20, "vocab_size": 120, "shard_size": 8, "train_fraction": {},
          **kw}
    build_lm_corpus("lm_help", out, help_root=root, **kw)
    return out
