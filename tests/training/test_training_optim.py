"""The one optimizer: parameter groups (decay, no decay, the selectors' logits phi) and their learning rates."""

from __future__ import annotations

import pytest
import torch

from hs_scale.config import load_config
from hs_scale.models import build_model
from hs_scale.selection.selector import HeadSelector
from hs_scale.training.optim import build_optimizer

TINY = "tests/launchers/tiny_launch.yaml"


def _model_and_optimizer(*overrides: str):
    cfg = load_config(TINY, list(overrides))
    model = build_model(cfg.model, cfg.selection, num_tasks=4)
    return cfg, model, *build_optimizer(model, cfg.train)


def _phi(model) -> list[torch.nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, HeadSelector) for p in m.parameters()]


def test_selector_logits_get_no_decay_and_by_default_no_group_of_their_own():
    _, model, optimizer, _ = _model_and_optimizer("--train.weight_decay", "0.1")
    assert len(optimizer.param_groups) == 2  # older optimizer states (two groups) keep loading
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in _phi(model)} <= {id(p) for p in no_decay["params"]}
    assert all(p.ndim >= 2 for p in decay["params"])


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # stepping the schedule only
def test_selector_lr_scale_moves_phi_that_many_times_faster():
    """Adam's first step moves every parameter by lr * factor (m / sqrt(v) = +-1): phi by scale times that."""
    cfg, model, optimizer, scheduler = _model_and_optimizer("--train.selector_lr_scale", "10",
                                                            "--train.weight_decay", "0.1")
    assert len(optimizer.param_groups) == 3
    phi_group = optimizer.param_groups[2]
    assert {id(p) for p in phi_group["params"]} == {id(p) for p in _phi(model)}
    assert phi_group["weight_decay"] == 0.0
    for _ in range(3):  # the schedule scales every group alike
        assert phi_group["lr"] == pytest.approx(10 * optimizer.param_groups[0]["lr"]) and phi_group["lr"] > 0
        scheduler.step()
    before = [p.detach().clone() for p in _phi(model)]
    weight = model.encoder.layers[0].fc1.weight
    w_before = weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    lr = optimizer.param_groups[0]["lr"]
    for p, b in zip(_phi(model), before, strict=True):
        torch.testing.assert_close((b - p).detach(), torch.full_like(b, 10 * lr), rtol=1e-4, atol=0)
    torch.testing.assert_close((w_before - weight).detach(), w_before * lr * 0.1 + lr, rtol=1e-4, atol=1e-9)
