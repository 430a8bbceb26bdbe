"""The text-to-text family: an encoder-decoder with one shared embedding table (HF M2M100 layout)."""

from hs_scale.models.text.model import TextTransformer

__all__ = ["TextTransformer"]
