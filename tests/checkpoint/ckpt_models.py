"""Shared pieces of the checkpoint tests: a tiny S2T model with head selection, a batch, one training step.

Imported by the test files and (through the harness, which re-imports worker files) by every spawned rank.
"""

from __future__ import annotations

import torch

ENC, DEC, VOCAB = 2, 2, 41  # 41: the vocab-parallel embedding pads it to 42 at TP2, not at TP1


def small_s2t(seed: int, dropout: float = 0.1):
    from _configs import tiny_model_config

    from hs_scale.models import build_model
    from hs_scale.selection.config import SelectionConfig

    torch.manual_seed(seed)
    cfg = tiny_model_config("s2t", encoder_layers=ENC, decoder_layers=DEC, vocab_size=VOCAB, dropout=dropout)
    return build_model(cfg, SelectionConfig(strategy="group", pool_heads=8), num_tasks=3)


def optimizer_for(model):
    """The trainer's AdamW (two param groups) and warm-up + inverse-sqrt LambdaLR."""
    from hs_scale.training.config import TrainConfig
    from hs_scale.training.optim import build_optimizer

    return build_optimizer(model, TrainConfig(lr=1e-3, warmup_steps=2, weight_decay=0.01))


def batch(seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(4, 12, 8, generator=g)
    lengths = torch.tensor([12, 9, 11, 6])
    tgt = torch.randint(4, VOCAB, (4, 6), generator=g)
    tgt[1, 4:] = 1  # padding (pad id 1)
    tgt[3, 3:] = 1
    dec_in = torch.cat([torch.full((4, 1), 2), tgt[:, :-1]], dim=1)
    return feats, lengths, dec_in, tgt, torch.tensor([0, 2, 1, 2]), torch.tensor([1, 1, 0, 2])


def loss(model, b) -> torch.Tensor:
    from hs_scale.training.loss import sequence_loss

    feats, lengths, dec_in, tgt, src_task, tgt_task = b
    logits = model(feats, lengths, dec_in, src_task_B=src_task, tgt_task_B=tgt_task)
    mean, _ = sequence_loss(logits, tgt, pad_id=1, label_smoothing=0.1)
    return mean


def train_step(model, optimizer, scheduler, step: int) -> float:
    model.train()
    value = loss(model, batch(100 + step))
    value.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return value.item()


@torch.no_grad()
def eval_loss(model) -> float:
    model.eval()
    out = loss(model, batch(7)).item()
    model.train()
    return out


def flat_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}
