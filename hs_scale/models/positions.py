"""Fairseq-style sinusoidal positions, numerically identical to HF Speech2Text / M2M100.

Legend: B batch, L sequence length (source or target), D model width.

Position ids start at padding_idx + 1 and count only non-pad entries; pad entries get position padding_idx, whose
row is all zeros. Incremental decoding adds the number of already decoded tokens (``past_length``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoid_table(num_embeddings: int, embedding_dim: int, padding_idx: int | None) -> Tensor:
    """[num_embeddings, embedding_dim] float32 table: sin in the first half, cos in the second (tensor2tensor order).

    Same operations in the same order as HF's ``get_embedding`` so that the floats match bit for bit.
    """
    half_dim = embedding_dim // 2
    freq = math.log(10000) / (half_dim - 1)
    freq_H = torch.exp(torch.arange(half_dim, dtype=torch.int64).float() * -freq)
    angle_NH = torch.arange(num_embeddings, dtype=torch.int64).float().unsqueeze(1) * freq_H.unsqueeze(0)
    table = torch.cat([torch.sin(angle_NH), torch.cos(angle_NH)], dim=1).view(num_embeddings, -1)
    if embedding_dim % 2 == 1:
        table = torch.cat([table, torch.zeros(num_embeddings, 1)], dim=1)
    if padding_idx is not None:
        table[padding_idx, :] = 0
    return table


def make_positions(nonpad_BL: Tensor, padding_idx: int, past_length: int = 0) -> Tensor:
    """Long [B, L] ids: padding_idx + 1 + past_length + (non-pad entries before this one); pad -> padding_idx."""
    mask_BL = nonpad_BL.int()
    return ((torch.cumsum(mask_BL, dim=1).type_as(mask_BL) + past_length) * mask_BL).long() + padding_idx


class SinusoidalPositions(nn.Module):
    """Fixed sinusoidal position embeddings with fairseq's offset of 2 rows; the table grows when needed.

    The table is a non-persistent buffer (as in HF): it is not in the state dict and follows ``.to(dtype)``.
    """

    offset = 2

    def __init__(self, num_positions: int, embedding_dim: int, padding_idx: int):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.register_buffer(
            "table", sinusoid_table(num_positions + self.offset, embedding_dim, padding_idx), persistent=False
        )

    @torch.no_grad()
    def forward(self, nonpad_BL: Tensor, past_length: int = 0) -> Tensor:
        """pos_BLD for the entries of ``nonpad_BL`` (bool, True = real token / frame)."""
        B, L = nonpad_BL.shape
        needed = self.padding_idx + 1 + past_length + L
        if needed > self.table.size(0):
            # Grow with the same slack HF uses; keep dtype/device of the current table.
            grown = sinusoid_table(needed + self.offset, self.embedding_dim, self.padding_idx)
            self.table = grown.to(dtype=self.table.dtype, device=self.table.device)
        pos_BL = make_positions(nonpad_BL, self.padding_idx, past_length)
        return self.table.index_select(0, pos_BL.view(-1)).view(B, L, -1)
