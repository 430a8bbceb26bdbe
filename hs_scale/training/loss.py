"""Label-smoothed cross-entropy with per-task sums (B batch, L target length, V vocabulary)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sequence_loss(logits_BLV: Tensor, target_BL: Tensor, pad_id: int, label_smoothing: float) -> tuple[Tensor, Tensor]:
    """(token-mean label-smoothed loss for backward, per-token nll [B, L] with 0 at padding, for reporting)."""
    flat_logits, flat_target = logits_BLV.float().flatten(0, 1), target_BL.flatten()
    loss = F.cross_entropy(flat_logits, flat_target, ignore_index=pad_id, label_smoothing=label_smoothing)
    nll = F.cross_entropy(flat_logits.detach(), flat_target, ignore_index=pad_id, reduction="none")
    return loss, nll.view_as(target_BL)


def per_task_sums(values_BL: Tensor, mask_BL: Tensor, task_B: Tensor, num_tasks: int) -> tuple[Tensor, Tensor]:
    """(sum of values, token count) per task: float [K], float [K]."""
    per_row = (values_BL * mask_BL).sum(dim=1).float()
    counts = mask_BL.sum(dim=1).float()
    sums = torch.zeros(num_tasks, device=values_BL.device).index_add_(0, task_B, per_row)
    totals = torch.zeros(num_tasks, device=values_BL.device).index_add_(0, task_B, counts)
    return sums, totals
