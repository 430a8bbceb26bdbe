"""The paper's S2T Transformer: Conv1d subsampler + pre-LN encoder-decoder (HF ``Speech2TextForConditionalGeneration``).

Legend: B batch, T feature frames, F features per frame, C channels, S encoder positions (T / 2**n_conv),
L target length, D model width, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hs_scale.models.config import ModelConfig
from hs_scale.models.layers import Encoder
from hs_scale.models.seq2seq import Seq2SeqModel
from hs_scale.selection.config import SelectionConfig


class Conv1dSubsampler(nn.Module):
    """Stride-2 Conv1d layers along time, each followed by a GLU over channels (HF / fairseq Conv1dSubsampler).

    F -> conv_channels -> GLU (/2) -> ... -> last conv to 2*D -> GLU -> D.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n = len(cfg.conv_kernel_sizes)
        self.conv_layers = nn.ModuleList(
            nn.Conv1d(
                cfg.input_feat_per_channel if i == 0 else cfg.conv_channels // 2,
                cfg.conv_channels if i < n - 1 else cfg.d_model * 2,
                kernel_size=k,
                stride=2,
                padding=k // 2,
            )
            for i, k in enumerate(cfg.conv_kernel_sizes)
        )

    def forward(self, features_BTF: Tensor) -> Tensor:
        """x_BSD from features_BTF. Padded frames are convolved too (as in HF); the length mask hides them later."""
        x_BCT = features_BTF.transpose(1, 2).contiguous()
        for conv in self.conv_layers:
            x_BCT = nn.functional.glu(conv(x_BCT), dim=1)
        return x_BCT.transpose(1, 2).contiguous()


class SpeechEncoder(Encoder):
    """Subsampler + scaling, then the shared encoder stack (so HF's ``model.encoder.conv`` maps to ``encoder.conv``)."""

    def __init__(self, cfg: ModelConfig, pool_heads: int | None):
        super().__init__(cfg, pool_heads)
        self.conv = Conv1dSubsampler(cfg)
        self.embed_scale = cfg.d_model**0.5 if cfg.scale_embedding else 1.0


class S2TTransformer(Seq2SeqModel):
    """Speech encoder-decoder with per-task head selection; with selection off, HF Speech2Text exactly."""

    def __init__(self, cfg: ModelConfig, selection: SelectionConfig | None = None, num_tasks: int = 1):
        if cfg.arch != "s2t":
            raise ValueError(f"S2TTransformer needs model.arch='s2t', got {cfg.arch!r}")
        super().__init__(cfg, selection, num_tasks)
        self.encoder = SpeechEncoder(cfg, self.pool_heads("encoder_self"))
        # Hybrid CTC/attention: a linear CTC head on the encoder output (blank = the pad id, never a label).
        self.ctc_head = nn.Linear(cfg.d_model, cfg.vocab_size) if cfg.ctc_weight > 0 else None
        self.apply(self._init_weights)

    def embed_source(self, features_BTF: Tensor, feature_lengths_B: Tensor | None = None) -> Tensor:
        """x_BSD: subsampled, scaled filterbanks. Padded frames are convolved too (as in HF); the mask hides them."""
        return self.encoder.conv(features_BTF) * self.encoder.embed_scale

    def source_padding_mask(self, features_BTF: Tensor, feature_lengths_B: Tensor | None = None) -> Tensor:
        """bool [B, S], True past each utterance's subsampled length (S = ModelConfig.subsampled_lengths(T))."""
        B, T = features_BTF.shape[:2]
        S, device = self.config.subsampled_lengths(T), features_BTF.device
        if feature_lengths_B is None:
            return torch.zeros(B, S, dtype=torch.bool, device=device)
        lengths_B = self.config.subsampled_lengths(feature_lengths_B.to(device))
        return torch.arange(S, device=device)[None, :] >= lengths_B[:, None]

    @staticmethod
    def batch_source(batch) -> tuple[Tensor, Tensor | None]:
        return batch.features, batch.feature_lengths

    def encode(
        self, features_BTF: Tensor, feature_lengths_B: Tensor | None = None, src_task_B: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(memory_BSD, memory_padding_mask_BS) from filterbanks features_BTF [B, T, F] (float, right-padded)
        and feature_lengths_B (long [B] valid frames; None = no padding). Mask: bool, True = padded position."""
        return self.encode_source((features_BTF, feature_lengths_B), src_task_B)

    def forward(
        self,
        features_BTF: Tensor,
        feature_lengths_B: Tensor | None,
        decoder_input_BL: Tensor,
        src_task_B: Tensor | None = None,
        tgt_task_B: Tensor | None = None,
        return_ctc: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """logits_BLV for teacher-forced decoder inputs (start token + target shifted right, pad-padded).

        With ``return_ctc`` (needs ``model.ctc_weight > 0``): (logits_BLV, ctc_logits_BSV, encoder_lengths_B), the
        CTC head's logits over the encoder positions and each utterance's number of valid positions.
        """
        hidden, memory_padding_mask_BS = self.forward_stack(
            (features_BTF, feature_lengths_B), decoder_input_BL, src_task_B, tgt_task_B
        )
        logits_BLV = self.output_projection(hidden.decoder_BLD)
        if not return_ctc:
            return logits_BLV
        if self.ctc_head is None:
            raise ValueError("return_ctc needs a CTC head: set model.ctc_weight > 0")
        return logits_BLV, self.ctc_head(hidden.memory_BSD), (~memory_padding_mask_BS).sum(1)
