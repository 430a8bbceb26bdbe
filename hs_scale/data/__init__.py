"""Streaming data pipeline: sharded speech/text corpora -> task-tagged, length-bucketed batches.

Public interface (what the trainer uses):
    DataConfig                      hs_scale.data.config
    build_tokenizer, load_tokenizer, Tokenizer   SentencePiece with <lang> and task tags
    build_loader(cfg, split, dp_rank, dp_size, tokenizer, train) -> StreamLoader yielding Batch

This package never imports hs_scale.models or hs_scale.training.
"""

from hs_scale.data.batch import Batch
from hs_scale.data.config import ERROR_KINDS, DataConfig
from hs_scale.data.loader import StreamLoader, build_loader
from hs_scale.data.tokenizer import Tokenizer, build_tokenizer, load_tokenizer

__all__ = ["Batch", "DataConfig", "ERROR_KINDS", "StreamLoader", "Tokenizer", "build_loader", "build_tokenizer",
           "load_tokenizer"]
