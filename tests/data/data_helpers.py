"""Tiny corpora built inside the tests (espeak-ng speech, no network).

`tiny_corpus`: 2 languages (de, fr) x 2 domains (ui, cli), 16 train + 4 dev rows per (lang, domain), shards of 4
rows -> 4 shards per stream (enough for 2 ranks x 2 workers), with precomputed features and English translations.
Session-scoped and read-only: tests that damage data copy it first (`corpus_copy`).
"""

from __future__ import annotations

import shutil

import pytest
import torch

WORDS = {
    "de": "der die das haus datei fenster öffnen schließen speichern drucken neu alt groß klein bild text".split(),
    "fr": "le la les maison fichier fenêtre ouvrir fermer enregistrer imprimer nouveau vieux grand petit image".split(),
    "en": "the a file window open close save print new old big small image text house door".split(),
}


def make_rows(langs=("de", "fr"), domains=("ui", "cli"), n_train=16, n_dev=4, tgt="same", seed=0):
    """Synthetic sentences (3-8 words) per (lang, domain, split)."""
    import random

    rnd = random.Random(seed)
    rows = []
    for lang in langs:
        for dom in domains:
            for split, n in (("train", n_train), ("dev", n_dev)):
                for _ in range(n):
                    k = rnd.randint(3, 8)
                    text = " ".join(rnd.choice(WORDS[lang]) for _ in range(k))
                    en = " ".join(rnd.choice(WORDS["en"]) for _ in range(k))
                    rows.append(dict(split=split, lang=lang, tgt_lang=lang if tgt == "same" else "en", domain=dom,
                                     text=text, translation=en))
    return rows


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    from data_pipelines.build import build_from_rows

    out = str(tmp_path_factory.mktemp("tiny") / "corpus")
    build_from_rows(make_rows(), out, modality="speech", features=True, shard_size=4, workers=1, vocab_size=200)
    return out


@pytest.fixture
def corpus_copy(tiny_corpus, tmp_path):
    dst = str(tmp_path / "corpus")
    shutil.copytree(tiny_corpus, dst)
    return dst
