"""hs_scale's head-selection models as transformers classes (all-tasks export, ``trust_remote_code=True``).

Legend: P = H' pool heads, H active heads, d head dim, D model width, K tasks.

Each selected attention layer keeps its whole pool: q_proj / k_proj / v_proj are ``PooledProjection``s with weight
[P*d, D]. On every call they gather the H heads the *active task* selected for that layer (config.head_selection,
the deterministic selection of the trained selector logits) and project with those rows only, so the attention
module itself is transformers' own, running an ordinary H-head attention. The straight-through slot weight of
training is exactly 1 in value, so inference needs nothing else.

    model = AutoModelForSeq2SeqLM.from_pretrained(path, trust_remote_code=True)    # text; speech: ...SpeechSeq2Seq
    out = model.generate(**inputs, task="de->en")     # encoder task -> decoder task; "de" = same task both sides
    with model.use_task("de"):                        # forward() / logits for one task
        logits = model(**inputs, decoder_input_ids=ids).logits

One task per call: split a mixed-task batch by task.
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers import M2M100ForConditionalGeneration, Speech2TextForConditionalGeneration

from .configuration_hs_scale import HsScaleM2M100Config, HsScaleSpeech2TextConfig

# attention type -> (stack, attribute of the layer, side whose task keys it). A standalone copy of
# hs_scale.selection.sites (this file ships alone); tests/export/test_export_remote_pins.py pins the two together.
_ATTENTION = {"encoder_self": ("encoder", "self_attn", "source"), "decoder_self": ("decoder", "self_attn", "target"),
              "cross": ("decoder", "encoder_attn", "target")}


class _ActiveTask:
    """The (encoder task id, decoder task id) every PooledProjection of one model reads; None = unset."""

    def __init__(self, num_tasks):
        self.num_tasks, self.ids = num_tasks, None

    def get(self, side):
        if self.ids is None:
            if self.num_tasks == 1:
                return 0
            raise ValueError("this model selects heads per task: pass task= to generate(), or use model.use_task()")
        return self.ids[0] if side == "source" else self.ids[1]


class PooledProjection(nn.Linear):
    """Linear D -> P*d holding the pool; forward projects with the active task's H heads (slot order)."""

    def __init__(self, embed_dim, pool_heads, head_dim, heads_per_task, active, side):
        super().__init__(embed_dim, pool_heads * head_dim)
        self.head_dim = head_dim
        self.heads_per_task = [list(h) for h in heads_per_task]  # [K][H], plain lists: no meta-device buffers
        self._active, self._side = active, side

    def forward(self, x):
        # The gather of hs_scale.selection.attention.gather_heads, restated: this file imports nothing of ours.
        heads = torch.tensor(self.heads_per_task[self._active.get(self._side)], device=self.weight.device)
        D = self.weight.shape[1]
        weight = self.weight.view(-1, self.head_dim, D).index_select(0, heads).reshape(-1, D)
        bias = None if self.bias is None else self.bias.view(-1, self.head_dim).index_select(0, heads).reshape(-1)
        return F.linear(x, weight, bias)


class _HeadSelectionMixin:
    """Pools in the selected attention layers, and the task argument of generate()."""

    def _install_pools(self):
        cfg = self.config
        self._active_task = _ActiveTask(max(1, len(cfg.task_names)))
        for attn_type, table in cfg.head_selection.items():
            stack_name, attr, side = _ATTENTION[attn_type]
            for layer_idx, layer in enumerate(getattr(self.model, stack_name).layers):
                attn = getattr(layer, attr)
                heads = [per_task[layer_idx] for per_task in table]
                for name in ("q_proj", "k_proj", "v_proj"):
                    pooled = PooledProjection(cfg.d_model, cfg.pool_heads, attn.head_dim, heads,
                                              self._active_task, side)
                    setattr(attn, name, pooled)

    def task_ids(self, task):
        """(encoder id, decoder id) of "name", "src->tgt" or ("src", "tgt"); hs_scale.export.materialize.parse_task,
        restated (standalone file) and pinned to it by tests/export/test_export_remote_pins.py."""
        if isinstance(task, (tuple, list)):
            src, tgt = task
        elif "->" in task:
            src, tgt = (t.strip() for t in task.split("->", 1))
        else:
            src = tgt = task
        names = list(self.config.task_names)
        for name in (src, tgt):
            if name not in names:
                raise ValueError(f"unknown task {name!r}; this model's tasks are {names}")
        return names.index(src), names.index(tgt)

    @contextmanager
    def use_task(self, task):
        """Run every forward inside the block with ``task``'s heads."""
        previous = self._active_task.ids
        self._active_task.ids = self.task_ids(task)
        try:
            yield self
        finally:
            self._active_task.ids = previous

    def generate(self, *args, task=None, **kwargs):
        """transformers' generate() for one task; its start token comes from config.task_decoder_start."""
        if task is None:
            return super().generate(*args, **kwargs)
        _, dec = self.task_ids(task)
        start = self.config.task_decoder_start.get(self.config.task_names[dec])
        if start is not None and "decoder_input_ids" not in kwargs:
            kwargs.setdefault("decoder_start_token_id", start)
        with self.use_task(task):
            return super().generate(*args, **kwargs)


class HsScaleSpeech2TextForConditionalGeneration(_HeadSelectionMixin, Speech2TextForConditionalGeneration):
    config_class = HsScaleSpeech2TextConfig

    def __init__(self, config):
        super().__init__(config)
        self._install_pools()


class HsScaleM2M100ForConditionalGeneration(_HeadSelectionMixin, M2M100ForConditionalGeneration):
    config_class = HsScaleM2M100Config

    def __init__(self, config):
        super().__init__(config)
        self._install_pools()
