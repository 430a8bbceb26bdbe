"""Label-smoothed cross-entropy of a teacher-forced batch (B batch, L target length, V vocabulary)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def sequence_loss(logits_BLV: Tensor, target_BL: Tensor, pad_id: int, label_smoothing: float) -> tuple[Tensor, Tensor]:
    """(token-mean label-smoothed loss for backward, per-token nll [B, L] with 0 at padding, for reporting)."""
    flat_logits, flat_target = logits_BLV.float().flatten(0, 1), target_BL.flatten()
    loss = F.cross_entropy(flat_logits, flat_target, ignore_index=pad_id, label_smoothing=label_smoothing)
    nll = F.cross_entropy(flat_logits.detach(), flat_target, ignore_index=pad_id, reduction="none")
    return loss, nll.view_as(target_BL)
