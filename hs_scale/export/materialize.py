"""One task's heads out of the pool: the dense H-head state dict that transformers' classes can hold.

Legend: K tasks, L layers, P = H' pool heads, H active heads (slots), d head dim, D model width, V vocabulary.

Inference in hs_scale is deterministic (``HeadSelector.table()``): for a task k and a selected attention type, layer
l feeds slot g from pool head ``table[k][l][g]``, with straight-through weight w = s - s.detach() + 1, which is
exactly 1 in value. So the dense model of task k is: rows ``table[k][l]`` of each pooled Q/K/V projection (weight
[P*d, D] viewed as [P, d, D], bias [P*d] as [P, d]), in slot order; the output projection is already [D, H*d]. The
encoder is keyed on the source task, decoder self- and cross-attention on the target task, so a task *pair*
("de->en") is what a dense model is exported for; a single name ("de") means the same task on both sides.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from hs_scale.models.config import ModelConfig
from hs_scale.selection.attention import gather_heads
from hs_scale.selection.config import SelectionConfig
from hs_scale.selection.selector import select_heads
from hs_scale.selection.sites import SITES

# ModelConfig fields that transformers' Speech2Text / M2M100 configs represent (hf_names.hf_config_kwargs) or that
# do not change the function the model computes. Any other field (an architecture option added to hs_scale later,
# e.g. a different norm or activation) must keep its default, or export is refused naming it.
EXPORTABLE_MODEL_FIELDS = frozenset(
    {
        "arch", "d_model", "encoder_layers", "decoder_layers", "num_heads", "ffn_dim", "vocab_size", "dropout",
        "attention_dropout", "activation_dropout", "conv_channels", "conv_kernel_sizes", "input_feat_per_channel",
        "max_source_positions", "max_target_positions", "pad_token_id", "bos_token_id", "eos_token_id",
        "decoder_start_token_id", "scale_embedding", "tie_embeddings", "attention_backend", "init_std",
        "ctc_weight",  # training only: the CTC head is dropped (hf_names.OURS_WITHOUT_HF)
    }
)  # fmt: skip


class ExportError(ValueError):
    """Something cannot be exported; the message names the option or task and what to do."""


def as_model_config(model_cfg: ModelConfig | dict) -> ModelConfig:
    """A ModelConfig from itself or from a config dict's ``model`` section, refusing options HF has no place for."""
    if isinstance(model_cfg, dict):
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(model_cfg) - known)
        if unknown:
            raise ExportError(
                f"model.{unknown[0]} is an architecture option this exporter does not know; transformers' "
                f"Speech2Text/M2M100 have no counterpart, so the checkpoint cannot be exported"
            )
        model_cfg = ModelConfig(**model_cfg)
    defaults = ModelConfig(arch=model_cfg.arch)
    for f in dataclasses.fields(ModelConfig):
        if f.name not in EXPORTABLE_MODEL_FIELDS and getattr(model_cfg, f.name) != getattr(defaults, f.name):
            raise ExportError(
                f"model.{f.name}={getattr(model_cfg, f.name)!r} has no counterpart in transformers' "
                f"{'Speech2Text' if model_cfg.arch == 's2t' else 'M2M100'} classes; export needs its default "
                f"{getattr(defaults, f.name)!r}"
            )
    return model_cfg


def as_selection_config(selection_cfg: SelectionConfig | dict | None) -> SelectionConfig:
    if selection_cfg is None:
        return SelectionConfig(enabled=False)
    return selection_cfg if isinstance(selection_cfg, SelectionConfig) else SelectionConfig(**selection_cfg)


def parse_task(task: str | tuple[str, str], task_names: list[str]) -> tuple[int, int]:
    """(encoder task id, decoder task id) of "name", "src->tgt" or ("src", "tgt"); unknown names are refused."""
    if isinstance(task, (tuple, list)):
        src, tgt = task
    elif "->" in task:
        src, tgt = (part.strip() for part in task.split("->", 1))
    else:
        src = tgt = task
    for name in (src, tgt):
        if name not in task_names:
            raise ExportError(f"unknown task {name!r}; this checkpoint's tasks are {list(task_names)}")
    return task_names.index(src), task_names.index(tgt)


def selection_tables(
    model_cfg: ModelConfig,
    selection_cfg: SelectionConfig,
    state: dict[str, Tensor],
    num_tasks: int,
    partitions: int = 1,
) -> dict[str, list[list[list[int]]]]:
    """table[type][task][layer] = pool heads in slot order, from the selector logits in ``state``.

    Same rule as ``HeadSelector.table()`` (deterministic ``select_heads``). ``partitions`` is the tensor-parallel
    size the run selected with: it changes the subset strategy (balanced subset), never the group strategy.
    """
    tables = {}
    H, P = model_cfg.num_heads, selection_cfg.pool_heads
    for attn_type in selection_cfg.selected_types():
        key = f"selectors.{attn_type}.logits"
        if key not in state:
            raise ExportError(f"state dict lacks {key}, but selection.{attn_type} is on in the config")
        logits_KLP = state[key].float()
        layers = SITES[attn_type].num_layers(model_cfg)
        if tuple(logits_KLP.shape) != (num_tasks, layers, P):
            raise ExportError(
                f"{key} has shape {tuple(logits_KLP.shape)}, expected (tasks={num_tasks}, layers={layers}, "
                f"pool={P}); are the task names those of the run?"
            )
        tau = float(state.get(f"selectors.{attn_type}.temperature", selection_cfg.temperature))
        per_layer = [
            select_heads(logits_KLP[:, layer], H, selection_cfg.strategy, tau, None, partitions).heads.tolist()
            for layer in range(layers)
        ]
        tables[attn_type] = [[per_layer[layer][k] for layer in range(layers)] for k in range(num_tasks)]
    return tables


def trim_vocab(model_cfg: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the rows a tensor-parallel run padded its vocabulary with (padded_vocab_size): HF has exactly V."""
    out = dict(state)
    for name in ("decoder.embed_tokens.weight", "lm_head.weight"):
        if name in out and out[name].shape[0] > model_cfg.vocab_size:
            out[name] = out[name][: model_cfg.vocab_size]
    return out


def dense_task_state(
    model_cfg: ModelConfig,
    selection_cfg: SelectionConfig,
    state: dict[str, Tensor],
    task_names: list[str],
    task: str | tuple[str, str],
    partitions: int = 1,
) -> dict[str, Tensor]:
    """Our dense (H' = H) state dict computing exactly what the pooled model computes for ``task``."""
    enc_id, dec_id = parse_task(task, list(task_names))
    tables = selection_tables(model_cfg, selection_cfg, state, len(task_names), partitions)
    dense = {k: v for k, v in trim_vocab(model_cfg, state).items() if not k.startswith("selectors.")}
    for attn_type, table in tables.items():
        site = SITES[attn_type]
        for layer, heads in enumerate(table[site.task(enc_id, dec_id)]):
            prefix = site.prefix(layer)
            for proj in ("q_proj", "k_proj", "v_proj"):
                weight = state[f"{prefix}.{proj}.weight"]
                index = torch.tensor(heads, dtype=torch.long, device=weight.device)
                w, b = gather_heads(weight, state.get(f"{prefix}.{proj}.bias"), index, model_cfg.head_dim)
                dense[f"{prefix}.{proj}.weight"] = w
                if b is not None:
                    dense[f"{prefix}.{proj}.bias"] = b
    return dense


def describe(obj: Any) -> str:
    return obj if isinstance(obj, str) else "->".join(obj)
