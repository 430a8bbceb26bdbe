"""The speech-to-text family: the paper's S2T Transformer (HF Speech2Text layout)."""

from hs_scale.models.s2t.model import Conv1dSubsampler, S2TTransformer, SpeechEncoder, cmvn_tensors, fold_cmvn

__all__ = ["Conv1dSubsampler", "S2TTransformer", "SpeechEncoder", "cmvn_tensors", "fold_cmvn"]
