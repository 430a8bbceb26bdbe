"""Text encoder-decoder with one embedding table (HF ``M2M100ForConditionalGeneration`` layout).

Legend: B batch, S source length, L target length, D model width, V vocabulary.
"""

from __future__ import annotations

from torch import Tensor, nn

from hs_scale.models.config import ModelConfig
from hs_scale.models.layers import Encoder
from hs_scale.models.seq2seq import Seq2SeqModel
from hs_scale.selection.config import SelectionConfig


class TextTransformer(Seq2SeqModel):
    """Token encoder-decoder with per-task head selection; with selection off, HF M2M100 exactly.

    The word embedding table lives at ``decoder.embed_tokens`` (one tensor in the state dict) and is used by the
    encoder too, and by the LM head when ``tie_embeddings`` (HF M2M100's ``shared``).
    """

    def __init__(self, cfg: ModelConfig, selection: SelectionConfig | None = None, num_tasks: int = 1):
        if cfg.arch != "text":
            raise ValueError(f"TextTransformer needs model.arch='text', got {cfg.arch!r}")
        super().__init__(cfg, selection, num_tasks)
        self.encoder = Encoder(cfg, self.pool_heads("encoder_self"))
        self.embed_scale = cfg.d_model**0.5 if cfg.scale_embedding else 1.0
        self.apply(self._init_weights)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.decoder.embed_tokens

    def embed_source(self, source_tokens_BS: Tensor) -> Tensor:
        """x_BSD: the shared table's scaled token embeddings."""
        return self.embed_tokens(source_tokens_BS) * self.embed_scale

    def source_padding_mask(self, source_tokens_BS: Tensor) -> Tensor:
        """bool [B, S], True = pad token."""
        return source_tokens_BS.eq(self.config.pad_token_id)

    @staticmethod
    def batch_source(batch) -> tuple[Tensor]:
        return (batch.source_tokens,)

    def encode(self, source_tokens_BS: Tensor, src_task_B: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(memory_BSD, memory_padding_mask_BS) from source_tokens_BS (long, padded with pad_token_id).
        Mask: bool, True = pad token."""
        return self.encode_source((source_tokens_BS,), src_task_B)

    def forward(
        self,
        source_tokens_BS: Tensor,
        decoder_input_BL: Tensor,
        src_task_B: Tensor | None = None,
        tgt_task_B: Tensor | None = None,
    ) -> Tensor:
        """logits_BLV for teacher-forced decoder inputs (start token + target shifted right, pad-padded)."""
        hidden, _ = self.forward_stack((source_tokens_BS,), decoder_input_BL, src_task_B, tgt_task_B)
        return self.output_projection(hidden.decoder_BLD)
