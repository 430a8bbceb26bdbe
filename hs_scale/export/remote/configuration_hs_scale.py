"""Configs of hs_scale's all-tasks export: Speech2Text / M2M100 configs plus the head-selection fields.

Written by ``hs-scale export-hf --all-tasks`` next to ``modeling_hs_scale.py``; loaded with
``trust_remote_code=True``. Extra fields:
  pool_heads          H', the pool size of every selected attention layer (H is encoder/decoder_attention_heads)
  head_selection      {attention type: table[task][layer] = pool heads in slot order} for the selected types
                      ("encoder_self" keyed on the source task, "decoder_self" and "cross" on the target task)
  task_names          task names, in task-id order
  task_decoder_start  {task name: first decoder token id} used by generate() for the target task
"""

from transformers import M2M100Config, Speech2TextConfig


def _selection_fields(config, pool_heads, head_selection, task_names, task_decoder_start):
    config.pool_heads = pool_heads
    config.head_selection = dict(head_selection or {})
    config.task_names = list(task_names or [])
    config.task_decoder_start = dict(task_decoder_start or {})


class HsScaleSpeech2TextConfig(Speech2TextConfig):
    model_type = "hs_scale_speech_to_text"

    def __init__(self, pool_heads=None, head_selection=None, task_names=None, task_decoder_start=None, **kwargs):
        _selection_fields(self, pool_heads, head_selection, task_names, task_decoder_start)
        super().__init__(**kwargs)


class HsScaleM2M100Config(M2M100Config):
    model_type = "hs_scale_m2m_100"

    def __init__(self, pool_heads=None, head_selection=None, task_names=None, task_decoder_start=None, **kwargs):
        _selection_fields(self, pool_heads, head_selection, task_names, task_decoder_start)
        super().__init__(**kwargs)
