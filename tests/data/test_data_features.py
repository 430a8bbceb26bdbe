"""Features: the vectorized filterbank matches kaldi-native-fbank; CMVN; SpecAugment in training only."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from hs_scale.data import DataConfig, build_loader, load_tokenizer
from hs_scale.data import features as F


def test_fbank_matches_kaldi_native_fbank():
    from data_pipelines.speech import synthesize_utterance

    rng = np.random.default_rng(0)
    for text, lang in (("Die Datei konnte nicht gespeichert werden", "de"), ("Ouvrir le fichier", "fr")):
        wav, _ = synthesize_utterance(text, lang, rng, "noisy")
        ref, fast = F.fbank_reference(wav), F.fbank(wav)
        assert ref.shape == fast.shape == (F.num_frames(len(wav)), 80)
        np.testing.assert_allclose(fast, ref, atol=1e-2, rtol=0)
    assert F.fbank(np.zeros(300, np.float32)).shape == (0, 80)


def test_cmvn_modes():
    x = np.random.default_rng(0).normal(3.0, 2.0, (200, 80)).astype(np.float32)
    y = F.CMVN("utterance")(x)
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-4)
    acc = F.CMVNAccumulator()
    acc.add(x)
    s = acc.to_json()
    z = F.CMVN("global", np.array(s["mean"]), np.array(s["std"]))(x)
    np.testing.assert_allclose(z.std(0), 1, atol=1e-3)


def test_spec_augment_only_in_training(tiny_corpus):
    tok = load_tokenizer(tiny_corpus)
    base = dict(manifest=tiny_corpus, num_workers=0, max_frames_per_batch=3000, bucket_pool=64, shuffle_window=4)
    aug = next(iter(build_loader(DataConfig(**base, spec_augment=True), "train", 0, 1, tok, True)))
    plain = next(iter(build_loader(DataConfig(**base, spec_augment=False), "train", 0, 1, tok, True)))
    assert aug.keys == plain.keys and not torch.equal(aug.features, plain.features)
    # Global CMVN is the model's: the loader masks raw features with the global mean (0 once normalised).
    changed = aug.features != plain.features
    mean = torch.from_numpy(F.CMVN.from_corpus(tiny_corpus, "global").mean).expand_as(aug.features)
    assert changed.any() and torch.equal(aug.features[changed], mean[changed])
    ev1 = list(itertools.islice(build_loader(DataConfig(**base, spec_augment=True), "dev", 0, 1, tok, False), 2))
    ev2 = list(itertools.islice(build_loader(DataConfig(**base, spec_augment=False), "dev", 0, 1, tok, False), 2))
    for a, b in zip(ev1, ev2, strict=True):
        assert torch.equal(a.features, b.features)
