"""Decoder-only LMs (Llama layout) with per-document query-head selection over grouped-query attention.

model = LMModel(LMConfig(**yaml["model"]), SelectionConfig(**yaml["selection"]), num_tasks=len(vocab))
logits_BLV = model(input_ids_BL, task_BL=None, position_ids_BL=None, doc_ids_BL=None, cache=None)
"""

from hs_scale.models.lm.config import LMConfig
from hs_scale.models.lm.model import LMCache, LMModel

__all__ = ["LMCache", "LMConfig", "LMModel"]
