"""Encoder-decoder models with per-task attention head selection (single device): one folder per family (s2t/,
text/), shared stacks (layers.py, seq2seq.py), and the registry of families (registry.py).

model = build_model(ModelConfig(**yaml["model"]), SelectionConfig(**yaml["selection"]), num_tasks=len(vocab))
logits_BLV = model(features_BTF, feature_lengths_B, decoder_input_BL, src_task_B, tgt_task_B)   # s2t
logits_BLV = model(source_tokens_BS, decoder_input_BL, src_task_B, tgt_task_B)                  # text
"""

from __future__ import annotations

from hs_scale.models.config import ModelConfig
from hs_scale.models.layers import DecoderCache
from hs_scale.models.registry import MODEL_SPECS, ModelSpec
from hs_scale.models.s2t import S2TTransformer
from hs_scale.models.seq2seq import ATTENTION_TYPES, Seq2SeqModel
from hs_scale.models.text import TextTransformer
from hs_scale.selection.config import SelectionConfig


def build_model(model_cfg: ModelConfig, selection_cfg: SelectionConfig | None, num_tasks: int) -> Seq2SeqModel:
    """The model of ``model_cfg.arch`` (its ModelSpec); ``selection_cfg`` None (or enabled=False) builds a dense
    model."""
    return MODEL_SPECS[model_cfg.arch].model_class(model_cfg, selection_cfg, num_tasks)


__all__ = [
    "ATTENTION_TYPES",
    "DecoderCache",
    "MODEL_SPECS",
    "ModelConfig",
    "ModelSpec",
    "S2TTransformer",
    "Seq2SeqModel",
    "TextTransformer",
    "build_model",
]
