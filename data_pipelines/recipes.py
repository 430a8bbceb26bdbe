"""Corpus recipes: asr8, st8, domains, mt, demo.

Every recipe picks cleaned human-translated (English, X) pairs (text_sources), assigns train/dev/test by a hash
of the English side, and hands the rows to build.build_from_rows (speech synthesized per utterance).

    recipe   modality  languages                    target            domains
    asr8     speech    de fr es it pt ru el ar      transcript (X)    from the catalog (ui/cli/db/misc)
    st8      speech    same sentences as asr8       English           test = LibreOffice multi-way set
    domains  speech    de fr es ru                  transcript        office, ui, cli (4 x 3 tasks)
    mt       text      X <-> en for the 8           the other side    from the catalog
    docs_mt  text      X <-> en, the 8 but ar       the other side    docs (LibreOffice help pages, by page)
    demo     speech    de fr es                     transcript        spoken numbers, digits and dates
                                                                      (data_pipelines.spoken); clean/noisy/fast
    spoken8  speech    de fr es it pt ru ar nl      transcript + en   the demo's domain in 8 languages
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os

from data_pipelines import text_sources as ts
from data_pipelines.build import build_from_rows

log = logging.getLogger(__name__)

LANGS8 = ("de", "fr", "es", "it", "pt", "ru", "el", "ar")


@dataclasses.dataclass
class Recipe:
    langs: tuple[str, ...]
    modality: str = "speech"
    target: str = "transcript"      # transcript | english | both_directions (mt)
    size: int = 4000                # train utterances in all (split evenly over langs x domains)
    dev_size: int = 400
    test_size: int = 400
    domains: tuple[str, ...] | None = None   # None = all catalog domains, labelled by catalog
    domain_from: str = "text"       # text | condition (acoustic condition as the domain)
    conditions: tuple[str, ...] = ("clean",)
    multiway_test: bool = False
    features: bool = False
    text_source: str = "installed"
    vocab_size: int = 4000
    shard_size: int = 100


RECIPES = {
    "asr8": Recipe(LANGS8, size=4000),
    "st8": Recipe(LANGS8, target="english", size=4000, multiway_test=True),
    "domains": Recipe(("de", "fr", "es", "ru"), size=3600, domains=("office", "ui", "cli")),
    "mt": Recipe(LANGS8, modality="text", target="both_directions", size=40000, dev_size=1600, test_size=1600,
                 vocab_size=8000, shard_size=2000),
    # Long-form MT on LibreOffice help pages (docs domain, split by page); Debian 12 has no Arabic help package.
    "docs_mt": Recipe(LANGS8[:-1], modality="text", target="both_directions", size=28000, dev_size=1400,
                      test_size=1400, domains=("docs",), text_source="help", vocab_size=8000, shard_size=2000),
    # NOTE: a bounded-vocabulary domain (spoken numbers, digit strings, dates) so that `make demo` ends with a
    # working recogniser after a few CPU minutes; see data_pipelines/spoken.py and docs/results.md.
    "demo": Recipe(("de", "fr", "es"), size=4800, dev_size=300, test_size=450, conditions=("clean", "noisy", "fast"),
                   domain_from="condition", features=True, text_source="spoken", vocab_size=256, shard_size=200),
    # The same bounded domain in 8 languages (num2words covers these; not Greek): the CPU preset of
    # benchmarks/paper, where open-vocabulary asr8 cannot be learned in CPU minutes.
    "spoken8": Recipe(("de", "fr", "es", "it", "pt", "ru", "ar", "nl"), target="english", size=9600, dev_size=800,
                      test_size=800, conditions=("clean", "noisy", "fast"), domain_from="condition", features=True,
                      text_source="spoken", vocab_size=512, shard_size=200),
}


def _take(pairs: list[ts.Pair], split: str, n: int, exclude_en: set[str]) -> list[ts.Pair]:
    out = [p for p in pairs if p.en not in exclude_en and ts.split_of_pair(p) == split]
    return out[:n]


def make_rows(r: Recipe, cache_dir: str) -> tuple[list[dict], list[str]]:
    """Sample rows for recipe r (no audio yet) and the source package files used."""
    if r.text_source == "spoken":
        from data_pipelines.spoken import spoken_rows

        k = len(r.langs)
        sizes = {"train": r.size // k, "dev": r.dev_size // k, "test": r.test_size // k}
        rows = spoken_rows(r.langs, sizes, r.conditions)
        if r.target == "transcript":  # the English side would only dilute the small tokenizer's vocabulary
            rows = [{**row, "translation": ""} for row in rows]
        return rows, []
    per_lang, debs = {}, []
    for lang in r.langs:
        pairs, d = ts.collect(lang, r.text_source, cache_dir, r.domains)
        per_lang[lang], debs = pairs, debs + d
    multi: list[str] = []
    exclude: set[str] = set()
    if r.multiway_test:
        office = {}
        for lang in r.langs:
            office[lang], d = ts.libreoffice_pairs(lang, cache_dir)
            debs += d
        multi_all = ts.multiway(office)
        exclude = set(multi_all)  # NOTE: no multi-way English sentence may appear in train/dev of any language
        # A hash order gives a reproducible, topic-mixed sample of the multi-way set (alphabetical would not).
        multi = sorted(multi_all, key=lambda en: hashlib.sha1(en.encode()).digest())[: r.test_size // len(r.langs)]
        office_map = {lang: {p.en: p for p in office[lang]} for lang in r.langs}
    doms = r.domains or (None,)
    rows: list[dict] = []
    for lang in r.langs:
        for dom in doms:
            pool = [p for p in per_lang[lang] if dom is None or p.domain == dom]
            k = len(r.langs) * len(doms)
            picks = {"train": _take(pool, "train", r.size // k, exclude),
                     "dev": _take(pool, "dev", r.dev_size // k, exclude)}
            picks["test"] = ([] if r.multiway_test else _take(pool, "test", r.test_size // k, exclude))
            if len(picks["train"]) < r.size // k:
                log.warning("%s/%s: only %d train pairs (asked %d)", lang, dom, len(picks["train"]), r.size // k)
            for split, ps in picks.items():
                rows += _rows_for(r, lang, split, ps, len(rows))
        if r.multiway_test:
            rows += _rows_for(r, lang, "test", [office_map[lang][en] for en in multi], len(rows))
    return rows, sorted(set(debs))


def _rows_for(r: Recipe, lang: str, split: str, pairs: list[ts.Pair], offset: int) -> list[dict]:
    out = []
    for i, p in enumerate(pairs):
        cond = r.conditions[(offset + i) % len(r.conditions)]
        dom = cond if r.domain_from == "condition" else p.domain
        if r.target == "both_directions":
            out.append(dict(split=split, lang=lang, tgt_lang="en", domain=dom, text=p.xx, translation=p.en))
            out.append(dict(split=split, lang="en", tgt_lang=lang, domain=dom, text=p.en, translation=p.xx))
            continue
        tgt = "en" if r.target == "english" else lang
        out.append(dict(split=split, lang=lang, tgt_lang=tgt, domain=dom, text=p.xx, translation=p.en,
                        condition=cond))
    return out


def build_recipe(name: str, out: str, cache_dir: str | None = None, workers: int = 1, seed: int = 0,
                 **overrides) -> dict:
    """Build recipe `name` into `out`. overrides: any Recipe field (size, features, text_source, ...)."""
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; choose from {sorted(RECIPES)}")
    r = dataclasses.replace(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "hs_scale", "debs")
    rows, debs = make_rows(r, cache_dir)
    info = {"recipe": name, "params": {k: (list(v) if isinstance(v, tuple) else v)
                                       for k, v in dataclasses.asdict(r).items()}, "source_packages": debs}
    return build_from_rows(rows, out, modality=r.modality, features=r.features, shard_size=r.shard_size,
                           workers=workers, seed=seed, vocab_size=r.vocab_size, info=info)
