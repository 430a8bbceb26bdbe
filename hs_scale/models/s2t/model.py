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


def cmvn_tensors(mean_F, std_F, weight_OFK: Tensor) -> tuple[Tensor, Tensor]:
    """(mean_F, inv_std_F) in the first convolution's dtype and device; std floored at 1e-5 as in
    hs_scale.data.features.CMVN. Raises ValueError if they do not have the convolution's F entries."""
    mean = torch.as_tensor(mean_F, dtype=torch.float32, device=weight_OFK.device)
    std = torch.as_tensor(std_F, dtype=torch.float32, device=weight_OFK.device)
    if mean.shape != (weight_OFK.shape[1],) or std.shape != (weight_OFK.shape[1],):
        raise ValueError(f"CMVN stats of shape {tuple(mean.shape)} / {tuple(std.shape)} for a subsampler with "
                         f"{weight_OFK.shape[1]} input features (model.input_feat_per_channel)")
    inv_std = 1.0 / std.clamp(min=1e-5)
    return mean.to(weight_OFK.dtype), inv_std.to(weight_OFK.dtype)


def fold_cmvn(weight_OFK: Tensor, bias_O: Tensor, mean_F: Tensor, inv_std_F: Tensor) -> tuple[Tensor, Tensor]:
    """The first convolution applied to (x - mean) * inv_std, as one convolution of raw x: (weight', bias').

    conv(W, b)((x - m) * s) = conv(W * s, b - sum_{f,k} W[:, f, k] * s[f] * m[f])(x) at every output position whose
    window lies inside the signal. Used by the model's forward and by the HF export alike, so both compute the
    same floats. weight_OFK [O, F, K], bias_O [O], mean_F / inv_std_F [F].
    """
    weight = weight_OFK * inv_std_F[None, :, None]
    bias = bias_O - (weight * mean_F[None, :, None]).sum(dim=(1, 2))
    return weight, bias


class Conv1dSubsampler(nn.Module):
    """Stride-2 Conv1d layers along time, each followed by a GLU over channels (HF / fairseq Conv1dSubsampler).

    F -> conv_channels -> GLU (/2) -> ... -> last conv to 2*D -> GLU -> D.

    Global CMVN (``data.cmvn: global``) is applied here, folded into the first convolution (``set_global_cmvn``),
    and the loader hands over raw filterbanks. WHY: the padding must mean the same thing here and in an exported HF
    model. The convolution's own zero padding (k // 2 frames at both ends) and the batch's zero padding are zeros of
    the *raw* features in HF (its feature extractor cannot apply global stats, so the export folds them into the
    weights); normalising in the loader made them zeros of the *normalised* features, i.e. different inputs at
    every utterance's first and last frames. Folded here, both models compute the same function of raw features,
    in training too, and the export is exact. The stats are buffers outside the state dict (set from the corpus's
    cmvn.json by whoever builds the model for it: ``hs_scale.data.features.use_global_cmvn``).
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
        self.register_buffer("cmvn_mean_F", None, persistent=False)
        self.register_buffer("cmvn_std_F", None, persistent=False)

    def set_global_cmvn(self, mean_F, std_F) -> None:
        """Normalise inputs as (x - mean) / max(std, 1e-5) (hs_scale.data.features.CMVN's rule) from now on.
        mean_F, std_F: [F] float sequences (the corpus's cmvn.json)."""
        cmvn_tensors(mean_F, std_F, self.conv_layers[0].weight)  # checks the shapes now rather than at forward
        device = self.conv_layers[0].weight.device
        self.cmvn_mean_F = torch.as_tensor(mean_F, dtype=torch.float32).to(device)
        self.cmvn_std_F = torch.as_tensor(std_F, dtype=torch.float32).to(device)

    def forward(self, features_BTF: Tensor, lengths_B: Tensor | None = None) -> Tensor:
        """x_BSD from features_BTF [B, T, F] with lengths_B (long [B] valid frames; None = no padding).

        Padding-invariant: each utterance's valid outputs are what it gives alone, unpadded. WHY: HF's subsampler
        convolves the batch's padding frames, and the outputs it computes from them reach the next convolution's
        window at the utterance's end, so an HF model's last encoder frames depend on what it is batched with.
        Here padded input frames are zeros (what the convolution's own padding gives an utterance alone) and each
        layer's outputs past the utterance's subsampled length are zeroed before the next layer, so batched
        training and ``hs-scale evaluate`` compute exactly what an exported model gives one utterance at a time.
        """
        x_BCT = features_BTF.transpose(1, 2).contiguous()
        if lengths_B is not None:
            x_BCT = x_BCT * self._valid(lengths_B, x_BCT)
        for i, conv in enumerate(self.conv_layers):
            if i == 0 and self.cmvn_mean_F is not None:
                mean_F, inv_std_F = cmvn_tensors(self.cmvn_mean_F, self.cmvn_std_F, conv.weight)
                weight, bias = fold_cmvn(conv.weight, conv.bias, mean_F, inv_std_F)
                y_BCT = nn.functional.conv1d(x_BCT, weight, bias, conv.stride, conv.padding)
            else:
                y_BCT = conv(x_BCT)
            x_BCT = nn.functional.glu(y_BCT, dim=1)
            if lengths_B is not None and i < len(self.conv_layers) - 1:  # the last layer's pads: the length mask
                lengths_B = (lengths_B - 1) // 2 + 1  # stride 2, padding k // 2 (ModelConfig.subsampled_lengths)
                x_BCT = x_BCT * self._valid(lengths_B, x_BCT)
        return x_BCT.transpose(1, 2).contiguous()

    @staticmethod
    def _valid(lengths_B: Tensor, x_BCT: Tensor) -> Tensor:
        """[B, 1, T] 1.0 at positions < length, else 0.0 (x's dtype and device)."""
        positions_T = torch.arange(x_BCT.shape[-1], device=x_BCT.device)
        return (positions_T[None, :] < lengths_B.to(x_BCT.device)[:, None]).to(x_BCT.dtype)[:, None, :]


class SpeechEncoder(Encoder):
    """Subsampler + scaling, then the shared encoder stack (so HF's ``model.encoder.conv`` maps to ``encoder.conv``)."""

    def __init__(self, cfg: ModelConfig, pool_heads: int | None):
        super().__init__(cfg, pool_heads)
        self.conv = Conv1dSubsampler(cfg)
        self.embed_scale = cfg.d_model**0.5 if cfg.scale_embedding else 1.0


class S2TTransformer(Seq2SeqModel):
    """Speech encoder-decoder with per-task head selection; with selection off, HF Speech2Text exactly on each
    utterance alone (HF's batched padding leaks into the last frames, ours does not: ``Conv1dSubsampler``)."""

    def __init__(self, cfg: ModelConfig, selection: SelectionConfig | None = None, num_tasks: int = 1):
        if cfg.arch != "s2t":
            raise ValueError(f"S2TTransformer needs model.arch='s2t', got {cfg.arch!r}")
        super().__init__(cfg, selection, num_tasks)
        self.encoder = SpeechEncoder(cfg, self.pool_heads("encoder_self"))
        # Hybrid CTC/attention: a linear CTC head on the encoder output (blank = the pad id, never a label).
        self.ctc_head = nn.Linear(cfg.d_model, cfg.vocab_size) if cfg.ctc_weight > 0 else None
        self.apply(self._init_weights)

    def embed_source(self, features_BTF: Tensor, feature_lengths_B: Tensor | None = None) -> Tensor:
        """x_BSD: subsampled, scaled filterbanks, each utterance's valid positions independent of the padding
        (``Conv1dSubsampler.forward``); the source padding mask hides the rest."""
        return self.encoder.conv(features_BTF, feature_lengths_B) * self.encoder.embed_scale

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
