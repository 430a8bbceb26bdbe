"""Parity with transformers: at pool == heads our LM is LlamaForCausalLM (same weights, logits within 1e-5 fp32).

Legend: B batch, L length, V vocabulary.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hs_scale.models.lm import LMModel  # noqa: E402
from hs_scale.models.lm.hf import hf_config_from_lm, lm_config_from_hf, our_name  # noqa: E402

# Llama 3 RoPE scaling with head_dim 8: wavelengths 6.3 (blended), 30, 140, 665 (divided by factor).
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def tiny_llama(**kw):
    base = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                max_position_embeddings=64)
    return transformers.LlamaConfig(**{**base, **kw})


def random_hf(hf_config, cls=None):
    """HF model with every tensor random (HF inits norms to 1 and biases to 0, which would hide name swaps)."""
    torch.manual_seed(0)
    hf = (cls or transformers.LlamaForCausalLM)(hf_config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    return hf


def ours_from_hf(hf) -> LMModel:
    model = LMModel(lm_config_from_hf(hf.config)).eval()
    state = {our_name(k): v for k, v in hf.state_dict().items()}
    if model.lm_head is None:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=True)
    return model


@pytest.mark.parametrize(
    "kw",
    [{}, {"attention_bias": True}, {"tie_word_embeddings": True}, {"num_key_value_heads": 4},
     {"num_key_value_heads": 1, "head_dim": 16}, {"rope_parameters": LLAMA3_ROPE}],
    ids=["gqa", "bias", "tied", "mha", "mqa-head_dim", "llama3-rope"],
)
def test_llama_logits_match(kw):
    hf = random_hf(tiny_llama(**kw))
    ours = ours_from_hf(hf)
    assert {our_name(k) for k in hf.state_dict()} - {"lm_head.weight"} <= set(ours.state_dict())
    ids_BL = torch.randint(0, 61, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids_BL).logits
        got = ours(ids_BL)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert hf_config_from_lm(ours.config).rope_parameters == hf.config.rope_parameters  # export keeps RoPE


def test_qwen2_and_mistral_logits_match():
    for cls_name, cfg_name in (("Qwen2ForCausalLM", "Qwen2Config"), ("MistralForCausalLM", "MistralConfig")):
        base = tiny_llama().to_dict()
        keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rope_parameters", "max_position_embeddings")
        hf_cfg = getattr(transformers, cfg_name)(**{k: base[k] for k in keep})
        hf = random_hf(hf_cfg, getattr(transformers, cls_name))
        ours = ours_from_hf(hf)
        ids_BL = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            torch.testing.assert_close(ours(ids_BL), hf(ids_BL).logits, atol=1e-5, rtol=1e-5, msg=cls_name)


def test_packed_documents_equal_separate_rows():
    """Two documents packed in one row (positions restart, attention within-document) equal two separate rows."""
    hf = random_hf(tiny_llama())
    ours = ours_from_hf(hf)
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 61, (1, 5), generator=gen), torch.randint(0, 61, (1, 7), generator=gen)
    docs = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        packed = ours(torch.cat([a, b], dim=1), doc_ids_BL=docs)
        torch.testing.assert_close(packed[:, :5], hf(a).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[:, 5:], hf(b).logits, atol=1e-5, rtol=1e-5)
