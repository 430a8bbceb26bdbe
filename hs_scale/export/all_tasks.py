"""``export_all_tasks``: every task in one transformers directory, head selection kept (remote code).

    export_all_tasks(model_cfg, selection_cfg, state_dict, task_names, "out/all", tokenizer_dir=...)
    model = AutoModelForSeq2SeqLM.from_pretrained("out/all", trust_remote_code=True)   # speech: ...SpeechSeq2Seq
    model.generate(**inputs, task="de")

Weights are the pooled model's own (selected Q/K/V projections keep all H' heads, renamed by
``hs_scale.models.hf_names``); config.json carries the deterministic head table per attention type, task and layer
and each task's decoder start token. The configuration and modeling files (``hs_scale/export/remote``) import only
torch and transformers and are registered for the Auto classes through ``auto_map``.
"""

from __future__ import annotations

import json
import os

from torch import Tensor

from hs_scale.export.cmvn_fold import fold_global_cmvn, model_cmvn
from hs_scale.export.hf_files import generation_config, write_support_files
from hs_scale.export.materialize import (
    ExportError,
    as_model_config,
    as_selection_config,
    selection_tables,
    trim_vocab,
)
from hs_scale.models.config import ModelConfig
from hs_scale.models.hf_names import OURS_WITHOUT_HF, hf_config_kwargs, hf_name_map
from hs_scale.models.registry import MODEL_SPECS
from hs_scale.selection.config import SelectionConfig

AUTO_CLASS = {arch: spec.auto_class for arch, spec in MODEL_SPECS.items()}


def remote_classes(arch: str):
    """(config class, model class) of the remote code, imported from this package."""
    from hs_scale.export.remote import configuration_hs_scale as conf
    from hs_scale.export.remote import modeling_hs_scale as modeling

    if arch == "s2t":
        return conf.HsScaleSpeech2TextConfig, modeling.HsScaleSpeech2TextForConditionalGeneration
    return conf.HsScaleM2M100Config, modeling.HsScaleM2M100ForConditionalGeneration


def pooled_hf_state_dict(model_cfg: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF names for our tensors, pooled projections kept whole (hf_names' table, without its dense check)."""
    names = hf_name_map(model_cfg)
    unknown = [k for k in state if k not in names and not k.startswith(OURS_WITHOUT_HF)]
    if unknown:
        raise ExportError(f"no HF name for {unknown[:5]} ({len(unknown)} tensors)")
    return {hf: state[ours] for ours, hfs in names.items() for hf in hfs}


def export_all_tasks(
    model_cfg: ModelConfig | dict,
    selection_cfg: SelectionConfig | dict | None,
    state_dict: dict[str, Tensor],
    task_names: list[str],
    out_dir: str,
    tokenizer_dir: str | None = None,
    *,
    task_decoder_start: dict[str, int] | None = None,
    partitions: int = 1,
    search=None,
    cmvn: str = "utterance",
    cmvn_stats: str | tuple | None = None,
) -> dict:
    """Write the all-tasks remote-code directory. ``task_decoder_start``: {task name: first decoder token}
    (missing tasks start from model.decoder_start_token_id). Other arguments as in ``export_task``."""
    model_cfg = as_model_config(model_cfg)
    selection_cfg = as_selection_config(selection_cfg)
    task_names = list(task_names)
    tables = selection_tables(model_cfg, selection_cfg, state_dict, len(task_names), partitions)
    starts = {name: int((task_decoder_start or {}).get(name, model_cfg.decoder_start_token_id)) for name in task_names}
    config_cls, model_cls = remote_classes(model_cfg.arch)
    config = config_cls(
        **hf_config_kwargs(model_cfg),
        pool_heads=selection_cfg.pool_heads if selection_cfg.enabled else model_cfg.num_heads,
        head_selection=tables,
        task_names=task_names,
        task_decoder_start=starts,
    )
    model = model_cls(config)
    state = fold_global_cmvn(model_cfg, trim_vocab(model_cfg, state_dict), cmvn, cmvn_stats)
    model.load_state_dict(pooled_hf_state_dict(model_cfg, state), strict=True)
    model.eval()
    # Per-task start tokens are applied by generate(task=...); the default is the first task's.
    model.generation_config = generation_config(model_cfg, starts[task_names[0]], search)
    config_cls.register_for_auto_class()
    model_cls.register_for_auto_class(AUTO_CLASS[model_cfg.arch])
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    notes = write_support_files(out_dir, model_cfg, tokenizer_dir, cmvn)
    summary = {"tasks": task_names, "auto_class": AUTO_CLASS[model_cfg.arch], "task_decoder_start": starts,
               "pool_heads": config.pool_heads, "notes": notes}
    with open(os.path.join(out_dir, "hs_scale_export.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    return summary


def export_all_tasks_from_model(model, task_names: list[str], out_dir: str, tokenizer_dir: str | None = None,
                                **kw) -> dict:
    """``export_all_tasks`` for a model in memory (an ``hs_scale.models`` Seq2SeqModel); its own global CMVN stats
    are folded in unless ``cmvn`` is given."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    kw = {**model_cmvn(model), **kw}
    return export_all_tasks(model.config, model.selection_config, state, task_names, out_dir, tokenizer_dir, **kw)
