"""Soft head-mask adaptation: only the chosen mask entries move, the model stays frozen, the loss goes down."""

import pytest
import torch
from lahis_helpers import make_lm, random_docs

from hs_scale.analysis.adaptation import adapt_mask, choose_heads, fold_mask, load_mask, save_mask, task_loss
from hs_scale.analysis.lahis import HeadMask


def _task(n: int, seed: int):
    """Prompt + answer examples: the answer repeats the prompt (learnable by rescaling heads)."""
    return [(d + d, len(d)) for d in random_docs(n, seed=seed, min_len=4, max_len=6)]


def test_choose_heads():
    scores = torch.tensor([[0.1, 0.9, 0.3], [0.5, 0.2, 0.8]], dtype=torch.float64)
    assert choose_heads(scores, 0.34) == [(0, 1), (1, 2)]
    assert choose_heads(scores, 0.01) == [(0, 1)]  # at least one head
    with pytest.raises(ValueError, match="fraction"):
        choose_heads(scores, 0.0)


def test_adapt_trains_only_chosen_entries_and_lowers_loss(tmp_path):
    model = make_lm("llama", layers=2, heads=4)
    before_weights = {k: v.clone() for k, v in model.state_dict().items()}
    scores = torch.zeros(2, 4, dtype=torch.float64)
    scores[0, 2], scores[1, 1] = 2.0, 1.0
    train = _task(6, seed=11)
    loss0 = task_loss(model, train)
    out = adapt_mask(model, scores, train, fraction=0.25, lr=0.1, epochs=2)
    mask = out["mask"]
    assert out["heads"] == [(0, 2), (1, 1)]
    untouched = torch.ones(2, 4, dtype=torch.bool)
    untouched[0, 2] = untouched[1, 1] = False
    assert torch.equal(mask[untouched], torch.ones(6))  # no weight decay or update outside the trained entries
    assert mask[0, 2] != 1.0 and mask[1, 1] != 1.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_weights[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert task_loss(model, train, mask) < loss0
    assert out["losses"][-1] < out["losses"][0]

    path = str(tmp_path / "mask.safetensors")
    save_mask(path, mask, out["heads"])
    torch.testing.assert_close(load_mask(path), mask)
    ids = torch.tensor([train[0][0]])
    with torch.no_grad(), HeadMask(model, mask):
        hooked = model(input_ids=ids).logits
    folded = fold_mask(model, load_mask(path))
    with torch.no_grad():
        torch.testing.assert_close(folded(input_ids=ids).logits, hooked, rtol=1e-5, atol=1e-6)


def test_task_loss_counts_answer_tokens_only():
    model = make_lm("llama")
    ids = random_docs(1, seed=4, min_len=8)[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    answer_ce = torch.nn.functional.cross_entropy(logits[4:-1], torch.tensor(ids[5:]))  # targets 5.. only
    all_ce = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
    assert task_loss(model, [(ids, 5)]) == pytest.approx(float(answer_ce), rel=1e-5)
    assert task_loss(model, [(ids, 0)]) == pytest.approx(float(all_ce), rel=1e-5)
    with pytest.raises(ValueError, match="answer token"):
        task_loss(model, [(ids[:3], 3)])
    with pytest.raises(ValueError, match="layers x"):
        fold_mask(model, torch.ones(3, 4))
