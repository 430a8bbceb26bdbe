"""The ``lm_help`` recipe: a multilingual language-modelling corpus of LibreOffice help pages (one document per page).

Source: Debian's ``libreoffice-help-XX`` packages (MPL-2.0; ~2,560 help pages per language, the same file names
in every language), fetched with ``apt-get download`` and unpacked with ``dpkg -x`` (text_sources.apt_download).
Debian ships the pages compiled from LibreOffice's XHP sources to HTML; the paragraphs and headings keep the XHP
ids (``par_id...``, ``hd_id...``) and are read with the stdlib HTML parser (libreoffice_help.paragraphs), not
with regular expressions.

A document is one page: its paragraphs in page order, joined by newlines. A paragraph that a translation leaves in
English (>= 80% of its words occur on the English page: `untranslated`) is a fallback and is dropped, so a
language holds only what was translated. ``hi`` is genuinely low-resource here (its help is mostly untranslated:
~1/10 of the English tokens are left); ``hi`` and ``km`` (about half translated) are made smaller still, and stay
small in a `--size` build, by `LMRecipe.train_fraction`. Sizes: docs/lm_data.md. Pages with fewer than
`min_chars` characters left are skipped.

Split: train/dev/test by a hash of the page path (text_sources.split_of on ``help:<page>``, the same key the
``docs_mt`` recipe uses), so one page is in the same split in every language, and LM test pages are MT test pages.

Output (data_pipelines.build.build_from_rows, modality "text"): WebDataset shards, manifest.parquet (one row per
document: lang = tgt_lang = the language, domain ``docs``, text = the document, translation empty; the page path is
the sample's ``source_id`` in its .json), tokenizer.model trained on the train split's paragraphs, info.json with
the licence, source packages and per-language document/token counts, and a README.md.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import re
from collections import defaultdict

from data_pipelines.libreoffice_help import paragraphs
from data_pipelines.text_sources import LIBREOFFICE_DIR, LIBREOFFICE_PKG, apt_download, split_of

log = logging.getLogger(__name__)

_WORD = re.compile(r"\w+")
HELP_SUBDIR = "usr/share/libreoffice/help"
LICENSE = ("MPL-2.0: LibreOffice help content (The Document Foundation), from Debian's libreoffice-help-XX "
           "packages; see usr/share/doc/libreoffice-help-XX/copyright in each package")


@dataclasses.dataclass
class LMRecipe:
    langs: tuple[str, ...]
    size: int = 0
    """Train documents per language at most (0 = every page that passes the filters)."""
    dev_size: int = 0
    """Dev documents per language at most (0 = all)."""
    test_size: int = 0
    min_chars: int = 200
    train_fraction: dict[str, float] = dataclasses.field(default_factory=dict)
    """{lang: f}: a low-resource language made on purpose: only a fraction f of its train pages is kept (chosen by
    a hash of the page path), and with `size` it gets round(f * size) train documents; dev and test untouched."""
    """Pages with fewer characters of translated text are skipped (characters, not words: Khmer has no spaces)."""
    vocab_size: int = 8000
    shard_size: int = 500


# The low-resource languages: hi (most of its help is untranslated, ~1/10 of the English tokens are left; half of
# its train pages are kept) and km (about half translated; 1/5 of its train pages are kept). Sizes: docs/lm_data.md.
LM_RECIPES = {
    "lm_help": LMRecipe(("en", "de", "fr", "es", "it", "ru", "eu", "et", "hi", "km"),
                        train_fraction={"hi": 0.5, "km": 0.2}),
}


def _kept(page: str, fraction: float) -> bool:
    """Whether a train page survives subsampling to `fraction` (a hash independent of split_of's)."""
    return int.from_bytes(hashlib.sha1(f"subsample:{page}".encode()).digest()[:8], "big") < fraction * 2**64


def _lang_dir(base: str, lang: str) -> str:
    for d in LIBREOFFICE_DIR.get(lang, [lang]) if lang != "en" else ["en-US"]:
        if os.path.isdir(os.path.join(base, d)):
            return os.path.join(base, d)
    raise FileNotFoundError(f"no LibreOffice help pages for {lang!r} under {base} (is libreoffice-help-"
                            f"{LIBREOFFICE_PKG.get(lang, lang)} unpacked there?)")


def help_pages(base: str) -> list[str]:
    """Page paths relative to the language dir (``text/swriter/guide/x.html``), in hash order: taking the first
    N is a reproducible, topic-mixed sample (sorted order would take one module's pages first)."""
    en = _lang_dir(base, "en")
    pages = [os.path.relpath(p, en) for p in glob.glob(os.path.join(en, "text", "**", "*.html"), recursive=True)]
    if not pages:
        raise FileNotFoundError(f"no English help pages under {en}/text")
    return sorted(pages, key=lambda p: hashlib.sha1(p.encode()).digest())


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def untranslated(text: str, english_words: set[str], max_share: float = 0.8) -> bool:
    """True for an English fallback paragraph: >= max_share of its words occur on the English page.

    NOTE: comparing with the English paragraph of the same id is not enough: a fallback often carries an older
    English string (another wording, spacing or markup), which would leak English into hi/km documents.
    """
    words = _words(text)
    return not words or sum(w in english_words for w in words) >= max_share * len(words)


def page_document(base: str, lang: str, page: str, english: dict[str, str] | None) -> str:
    """The document of one page in `lang`: paragraphs in page order joined by newlines; with `english` (the
    English page's {id: text}), untranslated paragraphs are dropped. "" when the page is missing."""
    path = os.path.join(_lang_dir(base, lang), page)
    if not os.path.exists(path):
        return ""
    paras = [t for t in paragraphs(path).values() if t]
    if english is not None:
        vocab = {w for t in english.values() for w in _words(t)}
        paras = [t for t in paras if not untranslated(t, vocab)]
    return "\n".join(paras)


def lm_rows(r: LMRecipe, help_root: str) -> list[dict]:
    """Manifest rows {split, lang, tgt_lang, domain, text, translation, source_id} for recipe `r`."""
    base = os.path.join(help_root, HELP_SUBDIR)
    limits = {"train": r.size, "dev": r.dev_size, "test": r.test_size}
    cap = {(lg, s): (max(1, round(n * r.train_fraction.get(lg, 1.0))) if s == "train" else n) if n else 0
           for lg in r.langs for s, n in limits.items()}
    for lang in r.langs:
        _lang_dir(base, lang)  # every language present before any parsing
    rows: list[dict] = []
    counts = {lang: defaultdict(int) for lang in r.langs}
    english: dict[str, dict[str, str]] = {}
    for page in help_pages(base):
        split = split_of("help:" + page)
        want = [lg for lg in r.langs if (not cap[lg, split] or counts[lg][split] < cap[lg, split])
                and (split != "train" or _kept(page, r.train_fraction.get(lg, 1.0)))]
        if not want:
            if all(cap[k] and counts[k[0]][k[1]] >= cap[k] for k in cap):
                break  # every language has every split full: stop parsing (the small builds stay fast)
            continue
        if page not in english:
            english[page] = paragraphs(os.path.join(_lang_dir(base, "en"), page))
        for lang in want:
            doc = page_document(base, lang, page, None if lang == "en" else english[page])
            if len(doc) < r.min_chars:
                continue
            counts[lang][split] += 1
            rows.append(dict(split=split, lang=lang, tgt_lang=lang, domain="docs", text=doc, translation="",
                             source_id="help:" + page))
    for lang in r.langs:
        if not counts[lang]["train"]:
            raise RuntimeError(f"{lang}: no help page has >= {r.min_chars} characters of translated text; "
                               "drop the language or lower min_chars")
    return rows


def corpus_stats(out: str) -> dict:
    """{lang: {split: {"docs", "tokens"}}}: documents and SentencePiece tokens (BOS/EOS not counted)."""
    from hs_scale.data.manifest import read_manifest
    from hs_scale.data.tokenizer import load_tokenizer

    m = read_manifest(os.path.join(out, "manifest.parquet"), ["split", "lang", "text"])
    tok = load_tokenizer(out)
    lens = [len(t) for t in tok.encode_batch(m["text"])]
    stats: dict = defaultdict(lambda: defaultdict(lambda: {"docs": 0, "tokens": 0}))
    for split, lang, n in zip(m["split"], m["lang"], lens, strict=True):
        stats[lang][split]["docs"] += 1
        stats[lang][split]["tokens"] += n
    return json.loads(json.dumps(stats))


def _readme(info: dict) -> str:
    lines = [f"# {info['recipe']}: multilingual LM corpus of LibreOffice help pages", "",
             f"Licence: {LICENSE}.", "",
             "Built by `hs-scale prepare-data --recipe lm_help` (data_pipelines/lm_corpus.py); one document per "
             "help page, untranslated paragraphs dropped, split by a hash of the page path.", "",
             "Source packages: " + ", ".join(info["source_packages"] or ["(a local help tree)"]), "",
             "| lang | train docs | train tokens | dev docs | dev tokens | test docs | test tokens |",
             "|---|---|---|---|---|---|---|"]
    for lang, s in sorted(info["lm_stats"].items()):
        cells = [str(s.get(sp, {}).get(k, 0)) for sp in ("train", "dev", "test") for k in ("docs", "tokens")]
        lines.append(f"| {lang} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def build_lm_corpus(name: str, out: str, cache_dir: str | None = None, seed: int = 0, help_root: str | None = None,
                    **overrides) -> dict:
    """Build LM recipe `name` into `out`; returns the info dict (also in info.json).

    help_root: an unpacked tree holding usr/share/libreoffice/help/<lang>/ (tests, or a machine without apt);
    by default the packages are downloaded into cache_dir/help. overrides: any LMRecipe field (langs, size, ...).
    """
    from data_pipelines.build import build_from_rows

    if name not in LM_RECIPES:
        raise KeyError(f"unknown LM recipe {name!r}; choose from {sorted(LM_RECIPES)}")
    r = dataclasses.replace(LM_RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})
    if not r.langs:
        raise ValueError("--languages is empty: give at least one language, e.g. en,de,fr")
    debs: list[str] = []
    if help_root is None:
        cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "hs_scale", "debs")
        d = os.path.join(cache_dir, "help")
        pkgs = ["libreoffice-help-en-us"] + [f"libreoffice-help-{LIBREOFFICE_PKG.get(lg, lg)}"
                                              for lg in r.langs if lg != "en"]
        debs = apt_download(pkgs, d)
        help_root = os.path.join(d, "root")
    rows = lm_rows(r, help_root)
    info = {"recipe": name, "params": {k: (list(v) if isinstance(v, tuple) else v)
                                       for k, v in dataclasses.asdict(r).items()},
            "source_packages": debs, "license": LICENSE}
    info = build_from_rows(rows, out, modality="text", shard_size=r.shard_size, seed=seed, vocab_size=r.vocab_size,
                           info=info)
    info["lm_stats"] = corpus_stats(out)
    with open(os.path.join(out, "info.json"), "w") as fh:
        json.dump(info, fh, indent=1, sort_keys=True)
    with open(os.path.join(out, "README.md"), "w") as fh:
        fh.write(_readme(info))
    return info
