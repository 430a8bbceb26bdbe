"""Optimizer and learning-rate schedules (Adam (0.9, 0.98), eps 1e-6, inverse-sqrt with warm-up: the paper's)."""

from __future__ import annotations

import math

import torch

from hs_scale.selection.selector import HeadSelector
from hs_scale.training.config import TrainConfig


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warm-up, then the schedule."""
    warmup = cfg.warmup_steps
    if warmup and step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "inverse_sqrt":
        return math.sqrt(max(warmup, 1) / (step + 1))
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def build_optimizer(model: torch.nn.Module | list[torch.nn.Module], cfg: TrainConfig):
    """(AdamW, LambdaLR) over every trainable parameter of `model` (or of each of this rank's model chunks), in
    two groups: weight decay cfg.weight_decay, and none for biases and norms (ndim < 2) and the head selectors'
    logits phi (a prior over heads, not a weight; found by type, wherever a model keeps its selectors). With
    cfg.selector_lr_scale != 1 phi gets a third group at that multiple of the lr (no decay; the default keeps
    two groups, so older optimizer states still load). The one optimizer of every layout."""
    own_group = cfg.selector_lr_scale != 1.0
    decay, no_decay, selectors = [], [], []
    for module in model if isinstance(model, list) else [model]:
        selector_params = {id(p) for m in module.modules() if isinstance(m, HeadSelector) for p in m.parameters()}
        for param in module.parameters():
            if not param.requires_grad:
                continue
            if id(param) in selector_params:
                (selectors if own_group else no_decay).append(param)
            else:
                (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if selectors:
        groups.append({"params": selectors, "weight_decay": 0.0, "lr": cfg.lr * cfg.selector_lr_scale})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    return optimizer, build_scheduler(optimizer, cfg)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step))
