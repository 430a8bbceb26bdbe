"""Head selection inside the models (H' = 2H): training signal, determinism, keying, switches, KV cache.

Legend: B batch, T frames, S source length, L target length, V vocabulary, H active heads, d head dim.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _configs import tiny_model_config

from hs_scale.models import ATTENTION_TYPES, build_model
from hs_scale.selection.config import SelectionConfig

H = 2
TINY = dict(d_model=16, num_heads=H, ffn_dim=24, vocab_size=30, conv_channels=8, input_feat_per_channel=6,
            conv_kernel_sizes=[3, 3])


def make(arch="s2t", num_tasks=3, dropout=0.1, seed=0, **selection):
    torch.manual_seed(seed)
    cfg = tiny_model_config(arch, dropout=dropout, attention_dropout=dropout, **TINY)
    return build_model(cfg, SelectionConfig(**{"pool_heads": 2 * H, **selection}), num_tasks)


def inputs(model, B=4):
    g = torch.Generator().manual_seed(2)
    dec_BL = torch.randint(3, 30, (B, 6), generator=g)
    dec_BL[:, 0] = 2
    if model.config.arch == "s2t":
        return (torch.randn(B, 21, 6, generator=g), torch.tensor([21, 17, 13, 21][:B])), dec_BL
    src_BS = torch.randint(3, 30, (B, 8), generator=g)
    src_BS[1, 5:] = 1
    return (src_BS,), dec_BL


@pytest.mark.parametrize("arch", ["s2t", "text"])
@pytest.mark.parametrize("strategy", ["group", "subset"])
def test_train_step_reaches_every_selector(arch, strategy):
    model = make(arch, strategy=strategy).train()
    src, dec_BL = inputs(model)
    logits_BLV = model(*src, dec_BL, torch.tensor([0, 1, 2, 0]), torch.tensor([2, 2, 1, 0]))
    loss = F.cross_entropy(logits_BLV[:, :-1].reshape(-1, 30), dec_BL[:, 1:].reshape(-1))
    loss.backward()
    for name in ATTENTION_TYPES:
        grad = model.selectors[name].logits.grad
        assert grad is not None and torch.isfinite(grad).all()
        # Every task in the batch gets a training signal (decoder keyed on the target tasks {0, 1, 2}).
        assert (grad.abs().sum(dim=(1, 2)) > 0).all(), name
    assert all(p.grad is not None for n, p in model.named_parameters() if "embed_positions" not in n)


def test_train_forward_draws_once_per_type_and_eval_draws_never():
    model = make().train()
    src, dec_BL = inputs(model)
    tasks = torch.tensor([0, 1, 2, 0])
    model(*src, dec_BL, tasks, tasks)
    assert [int(s.draws) for s in model.selectors.values()] == [1, 1, 1]
    model.eval()
    with torch.no_grad():
        first = model(*src, dec_BL, tasks, tasks)
        second = model(*src, dec_BL, tasks, tasks)
    assert torch.equal(first, second)
    assert [int(s.draws) for s in model.selectors.values()] == [1, 1, 1]


@pytest.mark.parametrize("arch", ["s2t", "text"])
def test_mixed_task_batch_equals_rows_run_alone(arch):
    """Each row uses its own source (encoder) and target (decoder) task's heads, whatever the other rows are."""
    model = make(arch).eval()
    src, dec_BL = inputs(model)
    src_B, tgt_B = torch.tensor([0, 1, 2, 1]), torch.tensor([2, 0, 1, 1])
    with torch.no_grad():
        batch_BLV = model(*src, dec_BL, src_B, tgt_B)
        for b in range(4):
            row = tuple(x[b : b + 1] for x in src)
            if arch == "s2t":  # a row alone has no padding: cut its features to its length
                row = (row[0][:, : int(row[1])], row[1])
            alone = model(*row, dec_BL[b : b + 1], src_B[b : b + 1], tgt_B[b : b + 1])
            torch.testing.assert_close(alone[0], batch_BLV[b], atol=1e-5, rtol=1e-5)


def split_tasks(model):
    """phi such that task 0 picks the even pool heads and task 2 the odd ones (random init may coincide)."""
    with torch.no_grad():
        for selector in model.selectors.values():
            selector.logits[0, :, 0::2], selector.logits[0, :, 1::2] = 1.0, -1.0
            selector.logits[2, :, 0::2], selector.logits[2, :, 1::2] = -1.0, 1.0
    return model


def test_encoder_keyed_on_source_task_and_decoder_on_target_task():
    enc_only = split_tasks(make(decoder_self=False, cross=False).eval())
    dec_only = split_tasks(make(encoder_self=False).eval())
    src, dec_BL = inputs(enc_only)
    a, b = torch.zeros(4, dtype=torch.long), torch.full((4,), 2)
    with torch.no_grad():
        assert torch.equal(enc_only(*src, dec_BL, a, a), enc_only(*src, dec_BL, a, b))
        assert not torch.allclose(enc_only(*src, dec_BL, a, a), enc_only(*src, dec_BL, b, a))
        assert torch.equal(dec_only(*src, dec_BL, a, a), dec_only(*src, dec_BL, b, a))
        assert not torch.allclose(dec_only(*src, dec_BL, a, a), dec_only(*src, dec_BL, a, b))


@pytest.mark.parametrize("flag", ["encoder_self", "decoder_self", "cross"])
def test_each_switch_changes_which_params_exist(flag):
    on, off = make(), make(**{flag: False})
    assert set(on.selectors) == set(ATTENTION_TYPES)
    assert set(off.selectors) == set(ATTENTION_TYPES) - {flag}
    module = {
        "encoder_self": "encoder.layers.0.self_attn",
        "decoder_self": "decoder.layers.0.self_attn",
        "cross": "decoder.layers.0.encoder_attn",
    }[flag]
    d = TINY["d_model"]
    assert on.state_dict()[f"{module}.q_proj.weight"].shape == (2 * d, d)  # pool of 2H heads
    assert off.state_dict()[f"{module}.q_proj.weight"].shape == (d, d)  # dense H heads
    assert on.state_dict()[f"{module}.out_proj.weight"].shape == (d, d)  # H slots either way
    dense = build_model(on.config, SelectionConfig(enabled=False), 3)
    assert not list(dense.selectors) and dense.selection_kl().item() == 0.0


def test_missing_task_ids_are_refused_with_the_argument_name():
    model = make(encoder_self=False).eval()
    src, dec_BL = inputs(model)
    with pytest.raises(ValueError, match="tgt_task_B"):
        model(*src, dec_BL, None, None)  # the encoder is dense, so no src_task_B is needed


def test_generation_draws_once_and_keeps_its_heads():
    """Train mode (noisy draws): every step of one generation uses the heads drawn at its first step."""
    model = make(dropout=0.0).train()
    src, dec_BL = inputs(model)
    tasks = torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        memory_BSD, mask_BS = model.encode(*src, tasks)
        cache = model.new_cache()
        steps = [model.decode(dec_BL[:, t : t + 1], memory_BSD, mask_BS, tasks, cache) for t in range(6)]
        assert int(model.selectors["decoder_self"].draws) == 1 and int(model.selectors["cross"].draws) == 1
        # The same fixed choice applied to the whole target in one call gives the same logits.
        replay = model.new_cache()
        replay.choices = cache.choices
        full_BLV = model.decode(dec_BL, memory_BSD, mask_BS, tasks, replay)
    torch.testing.assert_close(torch.cat(steps, 1), full_BLV, atol=1e-5, rtol=1e-5)
    # The cache holds the H selected heads only, never the pool.
    assert cache.self_attn[1]["k"].shape == (4, H, 6, TINY["d_model"] // H)
    assert cache.cross_attn[1]["v"].shape == (4, H, memory_BSD.shape[1], TINY["d_model"] // H)


def test_cache_reorder_follows_beams():
    model = make("text").eval()
    src, dec_BL = inputs(model)
    tasks = torch.tensor([0, 1, 2, 0])
    perm = torch.tensor([3, 3, 0, 1])
    with torch.no_grad():
        memory_BSD, mask_BS = model.encode(*src, tasks)
        cache = model.new_cache()
        model.decode(dec_BL[:, :2], memory_BSD, mask_BS, tasks, cache)
        cache.reorder(perm)
        step = model.decode(dec_BL[perm, 2:3], memory_BSD[perm], mask_BS[perm], tasks[perm], cache)
        full = model.decode(dec_BL[perm, :3], memory_BSD[perm], mask_BS[perm], tasks[perm])
    torch.testing.assert_close(step[:, 0], full[:, 2], atol=1e-5, rtol=1e-5)


def test_selection_table_and_kl_delegate_to_selectors():
    model = make(num_tasks=3)
    table = model.head_selection_table()
    assert set(table) == set(ATTENTION_TYPES)
    assert len(table["encoder_self"]) == 3 and len(table["encoder_self"][0]) == model.config.encoder_layers
    assert all(len(heads) == H for heads in table["cross"][2])
    src_B, tgt_B = torch.tensor([0, 0]), torch.tensor([1, 2])
    expected = (
        model.selectors["encoder_self"].kl(src_B)
        + model.selectors["decoder_self"].kl(tgt_B)
        + model.selectors["cross"].kl(tgt_B)
    )
    torch.testing.assert_close(model.selection_kl(src_task_B=src_B, tgt_task_B=tgt_B), expected)
    model.selection_kl(src_task_B=src_B, tgt_task_B=tgt_B).backward()
    assert model.selectors["encoder_self"].logits.grad[1:].abs().sum() == 0  # only task 0 was a source
    model.set_selection_temperature(1.0)
    assert all(float(s.temperature) == 1.0 for s in model.selectors.values())


def test_group_pool_must_be_a_multiple_of_heads():
    with pytest.raises(ValueError, match="pool_heads"):
        make(strategy="group", pool_heads=3)


@pytest.mark.parametrize("arch", ["s2t", "text"])
def test_bf16_forward_backward(arch):
    model = make(arch).to(torch.bfloat16).train()
    src, dec_BL = inputs(model)
    src = tuple(x.to(torch.bfloat16) if x.is_floating_point() else x for x in src)
    tasks = torch.tensor([0, 1, 2, 0])
    logits_BLV = model(*src, dec_BL, tasks, tasks)
    assert logits_BLV.dtype == torch.bfloat16 and torch.isfinite(logits_BLV).all()
    logits_BLV.float().logsumexp(-1).mean().backward()
    assert torch.isfinite(model.selectors["cross"].logits.grad).all()
