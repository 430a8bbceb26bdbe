"""``export_task``: one task of a head-selection model as a plain transformers model directory.

    export_task(model_cfg, selection_cfg, state_dict, task_names, "de", "out/de", tokenizer_dir="data/asr8")
    model = Speech2TextForConditionalGeneration.from_pretrained("out/de")     # no custom code

The directory is a real ``save_pretrained`` one: config.json, model.safetensors, generation_config.json, and the
tokenizer / feature-extractor / processor files (``hf_files``). The weights are ``dense_task_state`` (the task's
selected heads gathered out of the pool) renamed by ``hs_scale.models.hf_names``.
"""

from __future__ import annotations

import json
import os

import torch
from torch import Tensor

from hs_scale.export.cmvn_fold import fold_global_cmvn, model_cmvn
from hs_scale.export.hf_files import generation_config, write_support_files
from hs_scale.export.materialize import (
    ExportError,
    as_model_config,
    as_selection_config,
    dense_task_state,
    describe,
    parse_task,
    selection_tables,
)
from hs_scale.models.config import ModelConfig
from hs_scale.models.hf_names import HF_CLASSES, build_hf_config, to_hf_state_dict
from hs_scale.selection.config import SelectionConfig
from hs_scale.selection.sites import SITES


def resolve_decoder_start(config_dict: dict | None, task_names: list[str], decoder_task: str, tokenizer=None) -> int:
    """The first decoder token the run trained ``decoder_task`` with.

    synthetic runs: the task's tag (``SyntheticTask.tag``); corpus runs: ``<lang>`` of the decoder task's language
    (``data.decoder_start: lang_tag``, needs the tokenizer) or BOS (``bos``); otherwise model.decoder_start_token_id.
    """
    config_dict = config_dict or {}
    model = config_dict.get("model") or {}
    if config_dict.get("synthetic"):
        from hs_scale.data.synthetic import SyntheticConfig, SyntheticTask

        synthetic = SyntheticTask(SyntheticConfig(**config_dict["synthetic"]))
        return synthetic.tag(list(task_names).index(decoder_task))
    data = config_dict.get("data") or {}
    if data:
        if data.get("decoder_start", "lang_tag") == "bos":
            return tokenizer.bos_id if tokenizer is not None else int(model.get("bos_token_id", 0))
        key = data.get("task_key", "lang")
        if key == "domain":
            raise ExportError(
                "data.task_key=domain: the decoder task does not name the target language, so its <lang> start "
                "token is unknown; pass --decoder-start-token-id"
            )
        if tokenizer is None:
            raise ExportError("data.decoder_start=lang_tag needs the tokenizer to find <lang>; pass --tokenizer")
        return tokenizer.lang_tag_id(decoder_task.split("+", 1)[0])
    return int(model.get("decoder_start_token_id", ModelConfig().decoder_start_token_id))


def hf_model_from_dense(model_cfg: ModelConfig, dense: dict[str, Tensor]):
    """The transformers model (eval mode) holding our dense state dict."""
    import transformers

    hf = getattr(transformers, HF_CLASSES[model_cfg.arch])(build_hf_config(model_cfg))
    hf.load_state_dict(to_hf_state_dict(model_cfg, dense), strict=True)
    return hf.eval()


def export_task(
    model_cfg: ModelConfig | dict,
    selection_cfg: SelectionConfig | dict | None,
    state_dict: dict[str, Tensor],
    task_names: list[str],
    task: str | tuple[str, str],
    out_dir: str,
    tokenizer_dir: str | None = None,
    *,
    decoder_start_token_id: int | None = None,
    partitions: int = 1,
    search=None,
    cmvn: str = "utterance",
    cmvn_stats: str | tuple | None = None,
) -> dict:
    """Write the dense model of ``task`` ("de", or "de->en": encoder task -> decoder task) to ``out_dir``.

    decoder_start_token_id: the task's first decoder token (see ``resolve_decoder_start``); None keeps
        model.decoder_start_token_id. Written to config.json and generation_config.json.
    partitions: the tensor-parallel size the run selected with (matters for selection.strategy=subset only).
    search: a ``hs_scale.evaluation.search.SearchConfig`` whose beam / length settings generate() should use.
    cmvn / cmvn_stats: the run's data.cmvn and its corpus's cmvn.json or (mean, std) (speech): "global" stats are
        folded into the first convolution (``cmvn_fold``), "utterance" is written into the feature extractor.
    Returns a summary (also written as hs_scale_export.json): task, heads per type and layer, notes.
    """
    model_cfg = as_model_config(model_cfg)
    selection_cfg = as_selection_config(selection_cfg)
    task_names = list(task_names)
    enc_id, dec_id = parse_task(task, task_names)
    dense = dense_task_state(model_cfg, selection_cfg, state_dict, task_names, task, partitions)
    dense = fold_global_cmvn(model_cfg, dense, cmvn, cmvn_stats)
    start = model_cfg.decoder_start_token_id if decoder_start_token_id is None else int(decoder_start_token_id)
    if not 0 <= start < model_cfg.vocab_size:
        raise ExportError(f"decoder start token {start} is outside the vocabulary [0, {model_cfg.vocab_size})")

    hf = hf_model_from_dense(model_cfg, dense)
    hf.config.decoder_start_token_id = start  # also right for labels -> decoder_input_ids shifting
    hf.generation_config = generation_config(model_cfg, start, search)
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir)
    notes = write_support_files(out_dir, model_cfg, tokenizer_dir, cmvn)

    tables = selection_tables(model_cfg, selection_cfg, state_dict, len(task_names), partitions)
    summary = {
        "task": describe(task),
        "encoder_task": task_names[enc_id],
        "decoder_task": task_names[dec_id],
        "hf_class": HF_CLASSES[model_cfg.arch],
        "decoder_start_token_id": start,
        "pool_heads": selection_cfg.pool_heads if selection_cfg.enabled else model_cfg.num_heads,
        "heads": {t: table[SITES[t].task(enc_id, dec_id)] for t, table in tables.items()},
        "notes": notes,
    }
    with open(os.path.join(out_dir, "hs_scale_export.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    return summary


@torch.no_grad()
def export_task_from_model(model, task_names: list[str], task, out_dir: str, tokenizer_dir: str | None = None,
                           **kw) -> dict:
    """``export_task`` for a model in memory (an ``hs_scale.models`` Seq2SeqModel); a speech model's own global
    CMVN stats (``use_global_cmvn``) are folded in unless ``cmvn`` is given."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    kw = {**model_cmvn(model), **kw}
    return export_task(model.config, model.selection_config, state, task_names, task, out_dir, tokenizer_dir, **kw)
