"""Upcycling a dense HF checkpoint into a head-selection pool, and exporting one task back to LlamaForCausalLM.

Legend: B batch, L length, K tasks, H heads, r candidates per slot.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_lm_parity import random_hf, tiny_llama  # noqa: E402

from hs_scale.models.lm.generate import generate  # noqa: E402
from hs_scale.models.lm.hf import export_task, import_hf, selector_logits  # noqa: E402
from hs_scale.selection.config import SelectionConfig  # noqa: E402

K, H, R, LAYERS = 3, 4, 2, 2


@pytest.fixture(scope="module")
def dense_folder(tmp_path_factory):
    hf = random_hf(tiny_llama())
    folder = tmp_path_factory.mktemp("dense")
    hf.save_pretrained(folder)
    return folder, hf


def ids(B=2, L=9, seed=0):
    return torch.randint(0, 61, (B, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("strategy", ["group", "subset"])
def test_upcycled_pool_computes_the_dense_model(dense_folder, strategy):
    folder, hf = dense_folder
    scores = torch.rand(K, LAYERS, H, generator=torch.Generator().manual_seed(4))
    model = import_hf(folder, SelectionConfig(strategy=strategy, pool_heads=H * R), num_tasks=K, scores=scores)
    x = ids()
    with torch.no_grad():
        want = hf(x).logits
        for task in range(K):  # deterministic selection, every task
            torch.testing.assert_close(model.eval()(x, task_BL=torch.full((2,), task)), want, atol=1e-5, rtol=1e-5)
        if strategy == "group":  # any selection: random logits, noisy training draws, mixed-task rows
            model.selector.logits.normal_(0, 3)
            model.train()
            for _ in range(3):
                tasks = torch.randint(0, K, (2, 9))
                torch.testing.assert_close(model(x, task_BL=tasks), want, atol=1e-5, rtol=1e-5)


def test_selector_warm_start_rule():
    """Top-ranked heads of a task prefer its private copy (1), the rest the shared copy (0); one copy per slot."""
    scores = torch.tensor([[[0.1, 0.9, 0.5, 0.2]], [[0.8, 0.0, 0.3, 0.7]]])  # [K=2, layers=1, H=4]
    logits = selector_logits(2, 1, 4, 2, scores).view(2, 1, 4, 2)
    preferred = logits.argmax(-1)
    assert preferred.tolist() == [[[0, 1, 1, 0]], [[1, 0, 0, 1]]]
    low = logits.min()
    assert ((logits > low).sum(-1) == 1).all()
    top = logits.max(-1).values  # the most and least important heads get the most confident logits
    assert top[0, 0, 1] == top[0, 0, 0] == top.max() and top[0, 0, 1] > top[0, 0, 3]
    with pytest.raises(ValueError, match="expected \\[tasks, layers, heads\\]"):
        selector_logits(2, 1, 4, 2, scores[:, :, :3])


def trained_pool(folder):
    """An upcycled model whose copies and selection have diverged, as after training."""
    model = import_hf(folder, SelectionConfig(strategy="group", pool_heads=H * R), num_tasks=K)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "o_proj" in name:
                p.add_(torch.randn_like(p) * 0.2)
        model.selector.logits.normal_(0, 3)
    return model.eval()


def test_export_task_loads_in_transformers_and_matches(dense_folder, tmp_path):
    folder, _ = dense_folder
    model = trained_pool(folder)
    assert model.head_selection_table()[1] != model.head_selection_table()[2]
    out = export_task(model, 1, tmp_path / "task1", tokenizer_from=folder)
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".safetensors", ".bin")) == ["model.safetensors"]
    assert json.loads((out / "hs_scale_export.json").read_text())["heads"] == model.head_selection_table()[1]
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    x = ids(seed=1)
    with torch.no_grad():
        ours = model(x, task_BL=torch.tensor([1, 1]))
        torch.testing.assert_close(hf(x).logits, ours, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(model(x, task_BL=torch.tensor([2, 2])), ours)
    prompt = ids(B=1, L=5, seed=2)
    want = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = generate(model, prompt, torch.tensor([1]), max_new_tokens=12, eos_token_id=None)
    assert got.tolist() == want.tolist()


def test_export_of_a_qwen2_import_with_left_padded_generation(tmp_path):
    """Qwen2 (q/k/v biases, tied embeddings) upcycles exactly and exports as Llama with a zero o_proj bias;
    left-padded batched greedy generation equals transformers'."""
    base = tiny_llama().to_dict()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rope_parameters", "max_position_embeddings")
    hf = random_hf(transformers.Qwen2Config(tie_word_embeddings=True, **{k: base[k] for k in keep}),
                   transformers.Qwen2ForCausalLM)
    hf.save_pretrained(tmp_path / "qwen")
    model = trained_pool(tmp_path / "qwen")
    out = export_task(model, 0, tmp_path / "task0")
    llama = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    prompt = ids(B=2, L=6, seed=3)
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(llama(prompt[:1]).logits, model(prompt[:1], task_BL=torch.tensor([0])),
                                   atol=1e-5, rtol=1e-5)
    want = llama.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    got = generate(model, prompt, torch.tensor([0, 0]), max_new_tokens=8, attention_mask_BL=mask, eos_token_id=None)
    assert got.tolist() == want.tolist()


def test_sampling_is_seeded_and_stops_at_eos(dense_folder):
    folder, _ = dense_folder
    model = trained_pool(folder)
    prompt, task = ids(B=2, L=4, seed=6), torch.tensor([0, 2])
    a = generate(model, prompt, task, max_new_tokens=10, do_sample=True, top_k=5, seed=3, eos_token_id=None)
    b = generate(model, prompt, task, max_new_tokens=10, do_sample=True, top_k=5, seed=3, eos_token_id=None)
    c = generate(model, prompt, task, max_new_tokens=10, do_sample=True, top_k=5, seed=4, eos_token_id=None)
    assert a.shape == (2, 14) and a.tolist() == b.tolist() and a.tolist() != c.tolist()
    greedy = generate(model, prompt, task, max_new_tokens=10, eos_token_id=None)
    eos = int(greedy[0, 5])  # make the row's second generated token the end of sequence
    stopped = generate(model, prompt, task, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    assert stopped[0, 4:6].tolist() == greedy[0, 4:6].tolist() and (stopped[0, 6:] == 0).all()
