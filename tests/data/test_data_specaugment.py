"""SpecAugment masks what it says: bands of bounded width set to 0 (the CMVN mean), nothing else touched,
the same masks for the same seed, and the same masks after a resumed loader."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from hs_scale.data import DataConfig, build_loader, load_tokenizer
from hs_scale.data import features as F


def _bands(mask_1d: np.ndarray) -> list[tuple[int, int]]:
    """(start, width) of each run of True."""
    runs, start = [], None
    for i, m in enumerate([*mask_1d, False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


def test_masks_are_bounded_bands_and_nothing_else_changes():
    x = np.random.default_rng(0).normal(size=(300, 80)).astype(np.float32) + 5.0  # no natural zeros
    for seed in range(20):
        y = F.spec_augment(x, np.random.default_rng(seed), freq_masks=2, freq_width=15, time_masks=2, time_width=20)
        zero = y == 0.0
        freq_cols = zero.all(axis=0)  # a frequency mask zeroes a whole column
        time_rows = zero.all(axis=1)  # a time mask zeroes a whole row
        # every zero lies in a masked row or column; everything else is the input, bit for bit
        assert (zero == (freq_cols[None, :] | time_rows[:, None])).all()
        np.testing.assert_array_equal(y[~zero], x[~zero])
        assert sum(w for _, w in _bands(freq_cols)) <= 2 * 15
        assert all(w <= 2 * 15 for _, w in _bands(freq_cols))  # two bands may touch
        assert sum(w for _, w in _bands(time_rows)) <= 2 * min(20, int(0.2 * 300))
    assert not np.shares_memory(y, x) and (x != 0).all()  # the input is not modified in place


def test_time_masks_shrink_with_short_utterances():
    x = np.ones((30, 80), np.float32)
    for seed in range(50):
        y = F.spec_augment(x, np.random.default_rng(seed), freq_masks=0, time_masks=2, time_width=40,
                           max_time_ratio=0.2)
        assert (y == 0).all(axis=1).sum() <= 2 * 6  # at most 20% of 30 frames per mask


def test_same_seed_same_masks_other_seed_other_masks():
    x = np.random.default_rng(1).normal(size=(200, 80)).astype(np.float32)
    a = F.spec_augment(x, np.random.default_rng([0, 17, 3]))
    b = F.spec_augment(x, np.random.default_rng([0, 17, 3]))
    c = F.spec_augment(x, np.random.default_rng([0, 17, 4]))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_resumed_loader_masks_exactly_like_an_uninterrupted_one(tiny_corpus):
    tok = load_tokenizer(tiny_corpus)
    cfg = DataConfig(manifest=tiny_corpus, num_workers=0, max_frames_per_batch=3000, bucket_pool=64,
                     shuffle_window=4, spec_augment=True, freq_mask_width=10, time_mask_width=10)
    straight = list(itertools.islice(build_loader(cfg, "train", 0, 1, tok, True), 5))
    first = build_loader(cfg, "train", 0, 1, tok, True)
    it = iter(first)
    for _ in range(2):
        next(it)
    state = first.state_dict()
    resumed = build_loader(cfg, "train", 0, 1, tok, True)
    resumed.load_state_dict(state)
    after = list(itertools.islice(resumed, 3))
    assert any((b.features == 0).any() for b in after)  # masks were applied
    for want, got in zip(straight[2:], after, strict=True):
        assert want.keys == got.keys
        assert torch.equal(want.features, got.features)
