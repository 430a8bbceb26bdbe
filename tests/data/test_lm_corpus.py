"""The lm_help recipe on a small help tree written by the test (the Debian package layout; no apt needed)."""

from __future__ import annotations

import json
import os

import pytest
from lm_helpers import build_tiny_lm_corpus, page_paragraphs

from data_pipelines.lm_corpus import build_lm_corpus
from data_pipelines.text_sources import split_of
from hs_scale.data.manifest import read_manifest
from hs_scale.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_tiny_lm_corpus(str(tmp_path_factory.mktemp("lmc")))


def _shard_meta(corpus: str) -> dict[str, dict]:
    """{key: the sample's .json} read back with webdataset (the shards are plain WebDataset tars)."""
    import webdataset as wds

    m = read_manifest(os.path.join(corpus, "manifest.parquet"), ["shard"])
    urls = [os.path.join(corpus, s) for s in sorted(set(m["shard"]))]
    return {s["__key__"]: json.loads(s["json"]) for s in wds.WebDataset(urls, shardshuffle=False)}


def test_one_document_per_page_untranslated_dropped(corpus):
    pages = page_paragraphs()
    m = read_manifest(os.path.join(corpus, "manifest.parquet"))
    meta = _shard_meta(corpus)
    docs = {(lang, meta[k]["source_id"]): t for k, lang, t in zip(m["key"], m["lang"], m["text"], strict=True)}
    assert len(docs) == len(m["key"]) == 3 * len(pages)  # every page in every language, once
    for page, langs in pages.items():
        en = docs[("en", "help:" + page)]
        assert en == "\n".join(t for _, t in langs["en-US"])  # paragraphs kept in page order, header left out
        assert docs[("de", "help:" + page)] == "\n".join(t for _, t in langs["de"])
        # Hindi: the English fallbacks (every third paragraph, one reworded) are dropped, the rest kept.
        assert docs[("hi", "help:" + page)] == "\n".join(t for k, (_, t) in enumerate(langs["hi"]) if k % 3)
    for key, lang, dom, tgt, tr in zip(m["key"], m["lang"], m["domain"], m["tgt_lang"], m["translation"],
                                       strict=True):
        assert (dom, tgt, tr) == ("docs", lang, "")
        assert meta[key]["split"] == split_of(meta[key]["source_id"])  # split by page: same in every language
    assert {"train", "dev", "test"} <= set(m["split"])


def test_info_readme_and_token_counts(corpus):
    info = json.load(open(os.path.join(corpus, "info.json")))
    assert "MPL-2.0" in info["license"] and info["verify_problems"] == 0
    assert "MPL-2.0" in open(os.path.join(corpus, "README.md")).read()
    m = read_manifest(os.path.join(corpus, "manifest.parquet"), ["split", "lang", "text"])
    tok = load_tokenizer(corpus)
    for lang in ("en", "de", "hi"):
        rows = [t for s, lg, t in zip(m["split"], m["lang"], m["text"], strict=True) if lg == lang and s == "train"]
        assert info["lm_stats"][lang]["train"] == {"docs": len(rows),
                                                   "tokens": sum(len(tok.encode(t)) for t in rows)}
    # The tokenizer was trained on the train split's paragraphs of all three scripts: Devanagari is not <unk>.
    hi = next(t for s, lg, t in zip(m["split"], m["lang"], m["text"], strict=True) if lg == "hi")
    assert tok.unk_id not in tok.encode(hi.split("\n")[0])


def test_size_limits_documents_per_language(tmp_path):
    out = build_tiny_lm_corpus(str(tmp_path), size=4, langs=("en", "hi"), train_fraction={"hi": 0.5})
    m = read_manifest(os.path.join(out, "manifest.parquet"), ["split", "lang"])
    train = [lg for s, lg in zip(m["split"], m["lang"], strict=True) if s == "train"]
    assert (train.count("en"), train.count("hi")) == (4, 2)  # a low-resource language stays low in small builds


def test_missing_language_is_refused(tmp_path):
    from lm_helpers import write_help_tree

    write_help_tree(str(tmp_path / "tree"))
    with pytest.raises(FileNotFoundError, match="no LibreOffice help pages for 'fr'.*libreoffice-help-fr"):
        build_lm_corpus("lm_help", str(tmp_path / "out"), help_root=str(tmp_path / "tree"), langs=("en", "fr"))


def test_train_fraction_subsamples_train_pages_only(tmp_path):
    out = build_tiny_lm_corpus(str(tmp_path), train_fraction={"hi": 0.3})
    m = read_manifest(os.path.join(out, "manifest.parquet"), ["split", "lang"])
    n = {(lg, s): 0 for lg in ("en", "hi") for s in ("train", "dev", "test")}
    for s, lg in zip(m["split"], m["lang"], strict=True):
        if lg in ("en", "hi"):
            n[lg, s] += 1
    assert 0 < n["hi", "train"] < 0.6 * n["en", "train"]
    assert (n["hi", "dev"], n["hi", "test"]) == (n["en", "dev"], n["en", "test"])
