"""Label-smoothed cross-entropy of a teacher-forced batch (B batch, L target length, V vocabulary)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def token_losses(logits_BLV: Tensor, target_BL: Tensor, pad_id: int, label_smoothing: float) -> tuple[Tensor, Tensor]:
    """(label-smoothed loss summed over non-pad targets, per-token nll [B, L] (0 at padding, detached))."""
    flat_logits, flat_target = logits_BLV.float().flatten(0, 1), target_BL.flatten()
    loss_sum = F.cross_entropy(flat_logits, flat_target, ignore_index=pad_id, reduction="sum",
                               label_smoothing=label_smoothing)
    nll = F.cross_entropy(flat_logits.detach(), flat_target, ignore_index=pad_id, reduction="none")
    return loss_sum, nll.view_as(target_BL)


def sequence_loss(logits_BLV: Tensor, target_BL: Tensor, pad_id: int, label_smoothing: float) -> tuple[Tensor, Tensor]:
    """(token-mean label-smoothed loss, per-token nll [B, L]): the single-process reference of the tests."""
    loss_sum, nll_BL = token_losses(logits_BLV, target_BL, pad_id, label_smoothing)
    return loss_sum / target_BL.ne(pad_id).sum().clamp(min=1), nll_BL

