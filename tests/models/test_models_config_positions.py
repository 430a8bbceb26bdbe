"""ModelConfig validation (messages name the field and the fix) and sinusoidal positions (bit-exact with HF).

Legend: B batch, L length, D width.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from _configs import tiny_model_config

from hs_scale.models import ModelConfig
from hs_scale.models.positions import SinusoidalPositions, make_positions, sinusoid_table


def test_defaults_are_the_papers_s2t_transformer():
    cfg = ModelConfig()
    assert (cfg.arch, cfg.d_model, cfg.encoder_layers, cfg.decoder_layers, cfg.num_heads, cfg.ffn_dim) == (
        "s2t",
        256,
        12,
        6,
        4,
        2048,
    )
    assert cfg.conv_channels == 1024 and cfg.subsampling_factor == 4 and cfg.head_dim == 64


def test_loads_from_yaml_section():
    text = """
    model:
      arch: text
      d_model: 512
      encoder_layers: 6
      decoder_layers: 6
      num_heads: 4
      ffn_dim: 1024
      vocab_size: 32000
      conv_kernel_sizes: [5, 5]
    """
    cfg = ModelConfig(**yaml.safe_load(text)["model"])
    assert cfg.arch == "text" and cfg.head_dim == 128
    assert all(isinstance(v, (int, float, str, bool, list)) for v in dataclasses.asdict(cfg).values())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(arch="conformer"), "model.arch"),
        (dict(d_model=250, num_heads=4), r"model.d_model=250 is not divisible by model.num_heads=4"),
        (dict(num_heads=0), "model.num_heads"),
        (dict(dropout=1.0), "model.dropout"),
        (dict(attention_dropout=-0.1), "model.attention_dropout"),
        (dict(pad_token_id=10000), "model.pad_token_id.*vocab_size"),
        (dict(eos_token_id=-1), "model.eos_token_id"),
        (dict(attention_backend="xformers"), "model.attention_backend"),
        (dict(conv_kernel_sizes=[4, 5]), "model.conv_kernel_sizes.*odd"),
        (dict(conv_kernel_sizes=[]), "model.conv_kernel_sizes"),
        (dict(conv_channels=1023), "model.conv_channels.*even"),
        (dict(pad_token_id=0, bos_token_id=1), "pad_token_id=1"),
    ],
)
def test_invalid_configs_name_field_and_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_every_arch_has_a_model_spec_that_builds_it():
    from hs_scale.models import MODEL_SPECS, build_model
    from hs_scale.models.config import ARCHS
    from hs_scale.models.lm import LMConfig

    assert sorted(MODEL_SPECS) == sorted((*ARCHS, "lm"))  # the encoder-decoders' ModelConfig archs + the LM
    for arch, spec in MODEL_SPECS.items():
        cfg = (LMConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                        num_kv_heads=1) if arch == "lm" else tiny_model_config(arch))
        assert type(build_model(cfg, None, 1)) is spec.model_class and spec.arch == arch


@pytest.mark.parametrize("kernels", [[3], [5, 3], [5, 5, 3]])
def test_subsampled_lengths_is_what_the_convolutions_output(kernels):
    """The one subsampling formula (masks, pipeline p2p shapes, FLOPs) against the subsampler itself."""
    from hs_scale.models import build_model

    cfg = tiny_model_config("s2t", conv_kernel_sizes=kernels)
    conv = build_model(cfg, None, 1).encoder.conv
    for frames in (1, 2, 7, 8, 9, 16, 33):
        assert conv(torch.zeros(1, frames, cfg.input_feat_per_channel)).shape[1] == cfg.subsampled_lengths(frames)
    lengths = torch.tensor([1, 8, 33])
    assert cfg.subsampled_lengths(lengths).tolist() == [cfg.subsampled_lengths(int(n)) for n in lengths]
    assert tiny_model_config("text").subsampled_lengths(17) == 17


def test_text_arch_ignores_speech_fields_and_allows_other_pad_ids():
    cfg = ModelConfig(arch="text", pad_token_id=0, bos_token_id=1, conv_kernel_sizes=[4])
    assert cfg.subsampling_factor == 1


@pytest.mark.parametrize("dim", [16, 15])
def test_table_is_bit_identical_to_hf(dim):
    transformers = pytest.importorskip("transformers")
    s2t = transformers.models.speech_to_text.modeling_speech_to_text.Speech2TextSinusoidalPositionalEmbedding
    m2m = transformers.models.m2m_100.modeling_m2m_100.M2M100SinusoidalPositionalEmbedding
    ours = sinusoid_table(70, dim, 1)
    assert torch.equal(ours, s2t.get_embedding(70, dim, 1))
    assert torch.equal(ours, m2m.get_embedding(70, dim, 1))


@pytest.mark.parametrize("past", [0, 5])
def test_positions_skip_pads_and_continue_after_past(past):
    transformers = pytest.importorskip("transformers")
    m2m = transformers.models.m2m_100.modeling_m2m_100.M2M100SinusoidalPositionalEmbedding
    tokens_BL = torch.tensor([[1, 1, 7, 8, 9], [7, 8, 1, 1, 1], [4, 4, 4, 4, 4]])
    ours_BL = make_positions(tokens_BL.ne(1), padding_idx=1, past_length=past)
    assert torch.equal(ours_BL, m2m.create_position_ids_from_input_ids(tokens_BL, 1, past))
    assert ours_BL[0].tolist() == [1, 1, 2 + past, 3 + past, 4 + past]


def test_table_grows_beyond_its_initial_size_and_pads_are_zero():
    pos = SinusoidalPositions(num_positions=4, embedding_dim=8, padding_idx=1)
    nonpad_BL = torch.ones(2, 10, dtype=torch.bool)
    nonpad_BL[1, 7:] = False
    pos_BLD = pos(nonpad_BL, past_length=3)
    full = sinusoid_table(40, 8, 1)
    assert torch.equal(pos_BLD[0], full[5:15])  # first real position is padding_idx + 1 + past
    assert torch.equal(pos_BLD[1, 7:], torch.zeros(3, 8))
    assert "table" not in pos.state_dict()  # not persistent: nothing to load or export
