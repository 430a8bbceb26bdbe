"""The model families hs_scale can build, one `ModelSpec` each (torchtitan's model registry, in small).

`ModelConfig.arch` names a spec. Code that differs by family asks the spec (which class to build, which data
modality it reads, which transformers classes its exports are) instead of testing the arch name; a new family is
one folder under hs_scale/models/ plus one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from hs_scale.models.lm.model import LMModel
from hs_scale.models.s2t import S2TTransformer
from hs_scale.models.text import TextTransformer


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    """The `model.arch` value."""

    model_class: type[nn.Module]
    """Built as model_class(model_cfg, selection_cfg, num_tasks)."""

    modality: str
    """The `data.modality` its corpora have: "speech", "text" or "lm" (packed documents)."""

    hf_class: str
    """transformers class of a dense (per-task) export."""

    auto_class: str
    """transformers Auto class the all-tasks (remote-code) export registers for."""


MODEL_SPECS = {
    "s2t": ModelSpec("s2t", S2TTransformer, "speech", "Speech2TextForConditionalGeneration",
                     "AutoModelForSpeechSeq2Seq"),
    "text": ModelSpec("text", TextTransformer, "text", "M2M100ForConditionalGeneration", "AutoModelForSeq2SeqLM"),
    "lm": ModelSpec("lm", LMModel, "lm", "LlamaForCausalLM", "AutoModelForCausalLM"),
}  # fmt: skip
