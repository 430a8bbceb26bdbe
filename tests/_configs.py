"""Tiny model configs shared by the tests (plain functions; import with `from _configs import ...`).

Each test overrides only what it is about (a head count, a vocabulary, dropout); everything else is the same
small model everywhere, so a new ModelConfig field or a changed default is updated in one place.
"""

from __future__ import annotations

from hs_scale.models import ModelConfig


def tiny_model_config(arch: str = "s2t", **overrides) -> ModelConfig:
    """d_model 32, 2 + 2 layers, 4 heads (head dim 8), FFN 64, vocabulary 41 (a TP2 run pads it to 42), no
    dropout; s2t: one kernel-3 convolution with 16 channels over 8 features per frame."""
    fields = dict(d_model=32, encoder_layers=2, decoder_layers=2, num_heads=4, ffn_dim=64, vocab_size=41, dropout=0.0)
    if arch == "s2t":
        fields.update(conv_channels=16, conv_kernel_sizes=[3], input_feat_per_channel=8)
    return ModelConfig(arch=arch, **{**fields, **overrides})


def micro_model_config(arch: str = "text", **overrides) -> ModelConfig:
    """d_model 16, 1 + 1 layers, 2 heads, FFN 16, vocabulary 10, ModelConfig's default dropout; s2t: 8 conv
    channels (for file-format tests where the weights do not matter)."""
    fields = dict(d_model=16, encoder_layers=1, decoder_layers=1, num_heads=2, ffn_dim=16, vocab_size=10)
    if arch == "s2t":
        fields.update(conv_channels=8)
    return ModelConfig(arch=arch, **{**fields, **overrides})
