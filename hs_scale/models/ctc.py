"""CTC loss of the speech encoder's CTC head (hybrid CTC/attention ASR).

Legend: B batch, L target length (tokens + EOS, padded), S encoder positions, V vocabulary.
Used by the single-device step engine and by the last pipeline stage alike, so it lives with the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ctc_loss_sum(ctc_logits_BSV: Tensor, encoder_lengths_B: Tensor, target_BL: Tensor, target_lengths_B: Tensor,
                 blank: int) -> Tensor:
    """CTC loss summed over the batch (``torch.nn.functional.ctc_loss``, cuDNN/native kernels).

    target_BL is the decoder target (tokens, then EOS, then padding) and target_lengths_B counts tokens + EOS:
    CTC's labels are the tokens without the EOS. ``blank`` is the pad id, which is never a label. An utterance
    too short for its labels (impossible alignment) contributes 0 instead of inf (``zero_infinity``).
    """
    log_probs_SBV = F.log_softmax(ctc_logits_BSV.float(), dim=-1).transpose(0, 1)
    label_lengths_B = (target_lengths_B - 1).clamp(min=0)
    positions_BL = torch.arange(target_BL.shape[1], device=target_BL.device)[None, :]
    labels = target_BL[positions_BL < label_lengths_B[:, None]]  # concatenated labels, row after row
    return F.ctc_loss(log_probs_SBV, labels, encoder_lengths_B, label_lengths_B, blank=blank, reduction="sum",
                      zero_infinity=True)


def hybrid_loss(ce_sum: Tensor, ctc_sum: Tensor, ctc_weight: float) -> Tensor:
    """The hybrid CTC/attention objective (1 - ctc_weight) x CE + ctc_weight x CTC, both summed over the batch."""
    return (1.0 - ctc_weight) * ce_sum + ctc_weight * ctc_sum
