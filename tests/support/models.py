"""The tiny models of the distributed tests, one definition (workers in spawned ranks import it, fixtures in
tests/conftest.py wrap it for in-process tests).

SMALL_S2T: 2 + 2 layers, 4 heads from a pool of 8 (group selection), 3 tasks, vocabulary 41 (the vocab-parallel
embedding pads it to 42 at TP2, not at TP1): every TP / PP layout the tests use divides it.
"""

from __future__ import annotations

ENC, DEC, VOCAB, PAD, TASKS = 2, 2, 41, 1, 3

SMALL_S2T = dict(arch="s2t", d_model=32, encoder_layers=ENC, decoder_layers=DEC, num_heads=4, ffn_dim=64,
                 vocab_size=VOCAB, dropout=0.0, conv_channels=16, conv_kernel_sizes=[3], input_feat_per_channel=8)


def small_s2t_config(**overrides):
    """hs_scale ModelConfig of SMALL_S2T with `overrides` (e.g. ctc_weight=0.3, dropout=0.1)."""
    from hs_scale.models import ModelConfig

    return ModelConfig(**{**SMALL_S2T, **overrides})


def small_s2t(strategy: str = "group", kl_weight: float = 0.0, **overrides):
    """The SMALL_S2T model with head selection (pool 8, `strategy`), built with the caller's torch seed."""
    from hs_scale.models import build_model
    from hs_scale.selection.config import SelectionConfig

    selection = SelectionConfig(strategy=strategy, pool_heads=8, kl_weight=kl_weight)
    return build_model(small_s2t_config(**overrides), selection, num_tasks=TASKS)
