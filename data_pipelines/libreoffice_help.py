"""The ``docs`` domain: LibreOffice help pages (Debian ``libreoffice-help-XX``, MPL-2.0), aligned across languages.

Every help page exists in every language under the same file name (``usr/share/libreoffice/help/<lang>/text/...``),
and its paragraphs and headings carry ids (``<p id="par_id3146060">``, ``<h1 id="hd_id3150040">``) that are the
same in every translation. Pairs are (English, foreign) paragraphs with the same id on the same page; when both
sides split into the same number of sentences, each sentence pair is kept instead. Pages are split into
train/dev/test by a hash of the page's path, so no page crosses splits.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from html.parser import HTMLParser

from data_pipelines.text_sources import LIBREOFFICE_DIR, LIBREOFFICE_PKG, Pair, apt_download

log = logging.getLogger(__name__)
_ID = re.compile(r"^(par|hd)_id\d+")
_BLOCK = {"p", "div", "li", "ul", "ol", "br", "td", "tr", "table", "h1", "h2", "h3", "h4", "h5", "h6"}
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-ZÀ-ÖØ-ÞА-ЯΑ-Ω\"'«„])")
# Placeholders and markup left in the text, paths, URLs: not natural text.
_BAD_DOC = re.compile(r"%[A-Z]|\$\[|\{|\}|[<>|`@#^_\\]|\bhttps?\b|\w/\w|\.\w+\(")


class _Paragraphs(HTMLParser):
    """{id: text} of the elements whose id is a help paragraph / heading id (inline markup flattened)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out: dict[str, str] = {}
        self._id, self._depth, self._buf = None, 0, []

    def handle_starttag(self, tag, attrs):
        if self._id is not None:
            self._depth += 1
            if tag in _BLOCK:  # nested blocks (list items, paragraphs) must not run words together
                self._buf.append(" ")
            return
        pid = dict(attrs).get("id") or ""
        if _ID.match(pid):
            self._id, self._depth, self._buf = pid, 1, []

    def handle_endtag(self, tag):
        if self._id is None:
            return
        self._depth -= 1
        if tag in _BLOCK:
            self._buf.append(" ")
        if self._depth == 0:
            self.out.setdefault(self._id, " ".join("".join(self._buf).split()))
            self._id = None

    def handle_data(self, data):
        if self._id is not None:
            self._buf.append(data)


def paragraphs(path: str) -> dict[str, str]:
    p = _Paragraphs()
    with open(path, encoding="utf-8", errors="replace") as fh:
        p.feed(fh.read())
    return p.out


def clean_doc(text: str, min_words: int = 3, max_words: int = 60) -> str | None:
    text = " ".join(text.replace("\u00a0", " ").split())
    if _BAD_DOC.search(text) or not min_words <= len(text.split()) <= max_words:
        return None
    return text


def aligned_pairs(en_page: str, xx_page: str, page: str) -> list[Pair]:
    """Pairs of one page (English file, foreign file) by paragraph id, sentence-split where counts agree."""
    en, xx = paragraphs(en_page), paragraphs(xx_page)
    out = []
    for pid, e in en.items():
        x = xx.get(pid)
        if not x or x == e:
            continue
        es, xs = _SENT.split(e), _SENT.split(x)
        units = list(zip(es, xs, strict=True)) if len(es) == len(xs) > 1 else [(e, x)]
        for a, b in units:
            a, b = clean_doc(a), clean_doc(b)
            if a and b and a != b:
                out.append(Pair(a, b, "docs", "help:" + page))
    return out


def pairs_from_help_tree(root: str, lang: str) -> list[Pair]:
    """Pairs for `lang` from an unpacked help tree (root/usr/share/libreoffice/help/{en-US,<lang>}/...)."""
    base = os.path.join(root, "usr/share/libreoffice/help")
    xx_dir = next((os.path.join(base, d) for d in LIBREOFFICE_DIR.get(lang, [lang])
                   if os.path.isdir(os.path.join(base, d))), None)
    if xx_dir is None:
        raise RuntimeError(f"no LibreOffice help pages for {lang!r} under {base}")
    out = []
    for en_page in sorted(glob.glob(os.path.join(base, "en-US", "text", "**", "*.html"), recursive=True)):
        page = os.path.relpath(en_page, os.path.join(base, "en-US"))
        xx_page = os.path.join(xx_dir, page)
        if os.path.exists(xx_page):
            out += aligned_pairs(en_page, xx_page, page)
    return out


def help_pairs(lang: str, cache_dir: str) -> tuple[list[Pair], list[str]]:
    """`apt-get download` libreoffice-help-en-us and -<lang>, then pairs_from_help_tree (domain ``docs``)."""
    d = os.path.join(cache_dir, "help")
    debs = apt_download(["libreoffice-help-en-us", f"libreoffice-help-{LIBREOFFICE_PKG.get(lang, lang)}"], d)
    return pairs_from_help_tree(os.path.join(d, "root"), lang), debs
