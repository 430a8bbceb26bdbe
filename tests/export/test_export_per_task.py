"""Per-task export: plain Speech2Text / M2M100 directories reproduce hs_scale's logits and decoding for a task.

Legend: B batch, L target length, V vocabulary.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from export_helpers import (  # noqa: E402
    SYNTH,
    TASKS,
    eval_batch,
    forward,
    hf_inputs,
    hf_tokens,
    model_cfg,
    selection_cfg,
    train_tiny_cached,
)

from hs_scale.evaluation.search import SearchConfig, generate  # noqa: E402
from hs_scale.export import ExportError, export_task, export_task_from_model, resolve_decoder_start  # noqa: E402
from hs_scale.models import build_model  # noqa: E402

HF_CLASS = {"s2t": "Speech2TextForConditionalGeneration", "text": "M2M100ForConditionalGeneration"}
RUN = {"synthetic": SYNTH.__dict__}  # what a synthetic run's config dict holds for the start tokens


def export_and_load(model, arch: str, task: str, out) -> object:
    dec_task = task.split("->")[-1]
    start = resolve_decoder_start(RUN, TASKS, dec_task)
    export_task_from_model(model, TASKS, task, str(out), decoder_start_token_id=start)
    return getattr(transformers, HF_CLASS[arch]).from_pretrained(str(out)).eval()


@pytest.mark.parametrize("arch", ["text", "s2t"])
def test_exported_logits_match_every_task(trained, arch, tmp_path):
    model = trained[arch]
    tables = model.head_selection_table()
    assert len({str(tables["encoder_self"][k]) for k in range(len(TASKS))}) > 1, "tasks should pick different heads"
    for k, task in enumerate(TASKS):
        hf = export_and_load(model, arch, task, tmp_path / task)
        b = eval_batch(arch, k)
        with torch.no_grad():
            ours_BLV = forward(model, arch, b)
            theirs_BLV = hf(**hf_inputs(arch, b), decoder_input_ids=b.decoder_input).logits
        torch.testing.assert_close(theirs_BLV, ours_BLV, atol=1e-4, rtol=1e-4)
        files = set(os.listdir(tmp_path / task))
        assert {"config.json", "model.safetensors", "generation_config.json"} <= files
        gen = json.loads((tmp_path / task / "generation_config.json").read_text())
        assert gen["decoder_start_token_id"] == SYNTH.vocab_size - SYNTH.num_symbols - len(TASKS) + k


def test_task_pair_uses_source_heads_in_encoder_and_target_heads_in_decoder(trained, tmp_path):
    model = trained["text"]
    hf = export_and_load(model, "text", "copy->shift", tmp_path / "pair")
    b = eval_batch("text", 0)
    b.tgt_task = torch.full_like(b.src_task, 2)
    with torch.no_grad():
        torch.testing.assert_close(
            hf(**hf_inputs("text", b), decoder_input_ids=b.decoder_input).logits,
            forward(model, "text", b),
            atol=1e-4,
            rtol=1e-4,
        )


@pytest.mark.parametrize("beam", [1, 4])
@pytest.mark.parametrize("arch", ["text", "s2t"])
def test_generate_matches_hs_scale_search(trained, arch, beam, tmp_path):
    """Plain generate() (start token and pad suppression from generation_config.json) = hs_scale.evaluation.search."""
    model = trained[arch]
    for k, task in enumerate(TASKS):
        hf = export_and_load(model, arch, task, tmp_path / task)
        b = eval_batch(arch, k, batch_size=6)
        ours = generate(model, b, SearchConfig(beam=beam, max_len_b=20)).tokens
        with torch.no_grad():
            out = hf.generate(**hf_inputs(arch, b), num_beams=beam, max_new_tokens=21, do_sample=False)
        assert hf_tokens(out, model.config.eos_token_id) == ours, (task, beam)


def test_subset_strategy_and_tensor_parallel_partitions(tmp_path):
    """subset selection exported with the TP partitions it trained under (balanced subset) still matches."""
    model = train_tiny_cached("text", "subset")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    # A TP run pads the vocabulary: the exporter cuts the padded rows.
    state["decoder.embed_tokens.weight"] = torch.cat([state["decoder.embed_tokens.weight"], torch.zeros(2, 32)])
    export_task(model.config, model.selection_config, state, TASKS, "reverse", str(tmp_path), partitions=2)
    hf = transformers.M2M100ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    for selector in model.selectors.values():
        selector.partitions = 2
    b = eval_batch("text", 1)
    with torch.no_grad():
        torch.testing.assert_close(hf(**hf_inputs("text", b), decoder_input_ids=b.decoder_input).logits,
                                   forward(model, "text", b), atol=1e-4, rtol=1e-4)


def test_refusals_name_the_problem(trained, tmp_path):
    model = trained["text"]
    with pytest.raises(ExportError, match="unknown task 'klingon'"):
        export_task_from_model(model, TASKS, "klingon", str(tmp_path))
    with pytest.raises(ExportError, match="unknown task 'klingon'"):
        export_task_from_model(model, TASKS, "copy->klingon", str(tmp_path))
    cfg = {**model.config.__dict__, "norm_type": "rmsnorm"}
    with pytest.raises(ExportError, match="model.norm_type"):
        export_task(cfg, model.selection_config, model.state_dict(), TASKS, "copy", str(tmp_path))
    with pytest.raises(ExportError, match="shape"):
        export_task(model.config, model.selection_config, model.state_dict(), TASKS[:2], "copy", str(tmp_path))


def test_dense_model_exports_unchanged(tmp_path):
    cfg = model_cfg("s2t")
    dense = build_model(cfg, None, 1).eval()
    export_task_from_model(dense, ["only"], "only", str(tmp_path))
    hf = transformers.Speech2TextForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    b = eval_batch("s2t", 0)
    with torch.no_grad():
        torch.testing.assert_close(hf(**hf_inputs("s2t", b), decoder_input_ids=b.decoder_input).logits,
                                   dense(b.features, b.feature_lengths, b.decoder_input), atol=1e-4, rtol=1e-4)
    assert selection_cfg().pool_heads == 8
