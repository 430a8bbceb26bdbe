"""Parity with transformers: with H' = H our models are Speech2Text / M2M100, logits and KV-cached decoding alike.

Legend: B batch, T frames, F features, S source length, L target length, V vocabulary.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _configs import tiny_model_config  # noqa: E402
from _hf_speech import hf_logits_alone, hf_memory_alone  # noqa: E402

from hs_scale.models import ModelConfig, build_model  # noqa: E402
from hs_scale.models.hf_names import (  # noqa: E402
    build_hf_config,
    from_hf_state_dict,
    hf_name_map,
    to_hf_state_dict,
)
from hs_scale.selection.config import SelectionConfig  # noqa: E402

PAD = 1
HF_CLASS = {"s2t": "Speech2TextForConditionalGeneration", "text": "M2M100ForConditionalGeneration"}
DENSE = SelectionConfig(enabled=False)


def tiny_cfg(arch: str, **kw) -> ModelConfig:
    """Two subsampling convolutions (s2t) and every dropout on: what HF's layout must match."""
    extra = dict(conv_kernel_sizes=[5, 3]) if arch == "s2t" else {}
    return tiny_model_config(
        arch, ffn_dim=48, vocab_size=40, dropout=0.2, attention_dropout=0.1, activation_dropout=0.1, **{**extra, **kw}
    )


def random_hf(cfg: ModelConfig):
    """HF model with every tensor random (HF inits LayerNorms to 1/0 and biases to 0, which hides name swaps)."""
    torch.manual_seed(0)
    hf = getattr(transformers, HF_CLASS[cfg.arch])(build_hf_config(cfg)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
        if cfg.arch == "text" and not cfg.tie_embeddings:
            # Untied M2M100 keeps three tables; ours has one encoder/decoder table (see from_hf_state_dict).
            hf.model.encoder.embed_tokens.weight.copy_(hf.model.shared.weight)
            hf.model.decoder.embed_tokens.weight.copy_(hf.model.shared.weight)
    return hf


def ours_from_hf(cfg: ModelConfig, hf, selection: SelectionConfig = DENSE, num_tasks: int = 1):
    model = build_model(cfg, selection, num_tasks).eval()
    missing, unexpected = model.load_state_dict(from_hf_state_dict(cfg, hf.state_dict()), strict=False)
    assert not unexpected
    assert all(k.startswith("selectors.") for k in missing), missing
    return model


def batch(cfg: ModelConfig):
    """Inputs with padding on both sides of the model; targets right-padded with PAD."""
    g = torch.Generator().manual_seed(1)
    dec_BL = torch.randint(3, cfg.vocab_size, (3, 7), generator=g)
    dec_BL[:, 0] = cfg.decoder_start_token_id
    dec_BL[1, 5:] = PAD
    dec_BL[2, 3:] = PAD
    if cfg.arch == "s2t":
        feats_BTF = torch.randn(3, 37, cfg.input_feat_per_channel, generator=g)
        lens_B = torch.tensor([37, 30, 9])
        mask_BT = (torch.arange(37)[None] < lens_B[:, None]).long()
        return (feats_BTF, lens_B), dict(input_features=feats_BTF, attention_mask=mask_BT), dec_BL
    src_BS = torch.randint(3, cfg.vocab_size, (3, 9), generator=g)
    src_BS[1, 6:] = PAD  # right padding
    src_BS[2, :4] = PAD  # left padding: positions must skip the pads in both implementations
    return (src_BS,), dict(input_ids=src_BS, attention_mask=src_BS.ne(PAD).long()), dec_BL


def hf_logits(hf, hf_inputs, dec_BL):
    """HF's logits; speech: each utterance alone (our subsampler is padding-invariant, HF's is not: _hf_speech)."""
    if "input_features" in hf_inputs:
        return hf_logits_alone(hf, hf_inputs["input_features"], hf_inputs["attention_mask"].sum(1), dec_BL)
    with torch.no_grad():
        return hf(**hf_inputs, decoder_input_ids=dec_BL).logits


CASES = [("s2t", True), ("text", True), ("text", False), ("s2t", False)]


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("arch,tie", CASES)
def test_logits_match_hf(arch, tie, backend):
    cfg = tiny_cfg(arch, tie_embeddings=tie, attention_backend=backend)
    hf = random_hf(cfg)
    model = ours_from_hf(cfg, hf)
    inputs, hf_inputs, dec_BL = batch(cfg)
    with torch.no_grad():
        ours_BLV = model(*inputs, dec_BL)
        memory_BSD, mask_BS = model.encode(*inputs)
        if arch == "text":
            torch.testing.assert_close(memory_BSD, hf.model.encoder(**hf_inputs).last_hidden_state, atol=1e-5,
                                       rtol=1e-5)
    if arch == "s2t":
        for ours_SD, valid_S, theirs_SD in zip(memory_BSD, ~mask_BS, hf_memory_alone(hf, *inputs), strict=True):
            torch.testing.assert_close(ours_SD[valid_S], theirs_SD, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_BLV, hf_logits(hf, hf_inputs, dec_BL), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy", ["group", "subset"])
@pytest.mark.parametrize("arch", ["s2t", "text"])
def test_selection_with_pool_equal_to_heads_is_hf(arch, strategy):
    """H' = H with one task: every selector picks all heads in order, so the model is still HF's."""
    cfg = tiny_cfg(arch)
    hf = random_hf(cfg)
    model = ours_from_hf(cfg, hf, SelectionConfig(strategy=strategy, pool_heads=cfg.num_heads), num_tasks=1)
    assert set(model.selectors) == {"encoder_self", "decoder_self", "cross"}
    inputs, hf_inputs, dec_BL = batch(cfg)
    task_B = torch.zeros(3, dtype=torch.long)
    with torch.no_grad():
        ours_BLV = model(*inputs, dec_BL, task_B, task_B)
    torch.testing.assert_close(ours_BLV, hf_logits(hf, hf_inputs, dec_BL), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["s2t", "text"])
def test_incremental_decoding_matches_full(arch):
    """Token-by-token decoding through our KV cache = full decoding = HF, including the pad tail of a target."""
    cfg = tiny_cfg(arch)
    hf = random_hf(cfg)
    model = ours_from_hf(cfg, hf)
    inputs, hf_inputs, dec_BL = batch(cfg)
    with torch.no_grad():
        memory_BSD, mask_BS = model.encode(*inputs)
        full_BLV = model.decode(dec_BL, memory_BSD, mask_BS)
        cache = model.new_cache()
        steps = [model.decode(dec_BL[:, t : t + 1], memory_BSD, mask_BS, cache=cache) for t in range(dec_BL.shape[1])]
    step_BLV = torch.cat(steps, dim=1)
    torch.testing.assert_close(step_BLV, full_BLV, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step_BLV, hf_logits(hf, hf_inputs, dec_BL), atol=1e-5, rtol=1e-5)
    assert cache.length == dec_BL.shape[1]
    assert cache.self_attn[0]["k"].shape == (3, cfg.num_heads, dec_BL.shape[1], cfg.head_dim)


def test_incremental_decoding_in_chunks_matches_hf_cache():
    """A 3-token prefix then single tokens (prefix + cache, as in forced-prefix generation) against HF's cache."""
    cfg = tiny_cfg("text")
    hf = random_hf(cfg)
    model = ours_from_hf(cfg, hf)
    inputs, hf_inputs, dec_BL = batch(cfg)
    dec_BL = dec_BL[:1]  # unpadded row
    src = {k: v[:1] for k, v in hf_inputs.items()}
    with torch.no_grad():
        memory_BSD, mask_BS = model.encode(inputs[0][:1])
        cache = model.new_cache()
        ours = [model.decode(dec_BL[:, :3], memory_BSD, mask_BS, cache=cache)]
        ours += [model.decode(dec_BL[:, t : t + 1], memory_BSD, mask_BS, cache=cache) for t in range(3, 7)]
        enc = hf.model.encoder(**src)
        out = hf(
            encoder_outputs=enc, attention_mask=src["attention_mask"], decoder_input_ids=dec_BL[:, :3], use_cache=True
        )
        theirs, past = [out.logits], out.past_key_values
        for t in range(3, 7):
            out = hf(
                encoder_outputs=enc,
                attention_mask=src["attention_mask"],
                decoder_input_ids=dec_BL[:, t : t + 1],
                past_key_values=past,
                use_cache=True,
            )
            theirs.append(out.logits)
            past = out.past_key_values
    torch.testing.assert_close(torch.cat(ours, 1), torch.cat(theirs, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,tie", CASES)
def test_name_table_covers_both_state_dicts(arch, tie):
    cfg = tiny_cfg(arch, tie_embeddings=tie)
    hf = random_hf(cfg)
    ours = build_model(cfg, DENSE, 1)
    names = hf_name_map(cfg)
    assert set(names) == set(ours.state_dict())
    assert {h for hfs in names.values() for h in hfs} == set(hf.state_dict())
    # Export: our tensors load into a fresh HF model strictly and give the same logits.
    fresh = getattr(transformers, HF_CLASS[arch])(build_hf_config(cfg)).eval()
    fresh.load_state_dict(to_hf_state_dict(cfg, ours.state_dict()), strict=True)
    inputs, hf_inputs, dec_BL = batch(cfg)
    with torch.no_grad():
        torch.testing.assert_close(
            ours.eval()(*inputs, dec_BL), hf_logits(fresh, hf_inputs, dec_BL), atol=1e-5, rtol=1e-5
        )


def test_export_refuses_pooled_attention():
    cfg = tiny_cfg("text")
    model = build_model(cfg, SelectionConfig(pool_heads=2 * cfg.num_heads), 2)
    with pytest.raises(ValueError, match="pooled"):
        to_hf_state_dict(cfg, model.state_dict())


def test_import_refuses_distinct_encoder_and_decoder_tables():
    cfg = tiny_cfg("text", tie_embeddings=False)
    hf = random_hf(cfg)
    with torch.no_grad():
        hf.model.encoder.embed_tokens.weight.add_(1.0)
    with pytest.raises(ValueError, match="differ"):
        from_hf_state_dict(cfg, hf.state_dict())
