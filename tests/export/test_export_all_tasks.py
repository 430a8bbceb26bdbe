"""All-tasks export: one remote-code directory, head selection kept, task chosen in generate()."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from export_helpers import SYNTH, TASKS, eval_batch, forward, hf_inputs, hf_tokens  # noqa: E402

from hs_scale.evaluation.search import SearchConfig, generate  # noqa: E402
from hs_scale.export import export_all_tasks_from_model, resolve_decoder_start  # noqa: E402

AUTO = {"text": "AutoModelForSeq2SeqLM", "s2t": "AutoModelForSpeechSeq2Seq"}


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """arch -> (our model, the remote-code model loaded back with trust_remote_code)."""
    out = {}
    for arch, model in trained.items():
        path = tmp_path_factory.mktemp(f"all_{arch}")
        starts = {t: resolve_decoder_start({"synthetic": SYNTH.__dict__}, TASKS, t) for t in TASKS}
        export_all_tasks_from_model(model, TASKS, str(path), task_decoder_start=starts)
        config = json.loads((path / "config.json").read_text())
        assert config["auto_map"]["AutoConfig"].startswith("configuration_hs_scale.")
        assert AUTO[arch] in config["auto_map"]
        hf = getattr(transformers, AUTO[arch]).from_pretrained(str(path), trust_remote_code=True).eval()
        assert type(hf).__module__.startswith("transformers_modules"), "must be the exported remote code"
        out[arch] = (model, hf)
    return out


@pytest.mark.parametrize("arch", ["text", "s2t"])
def test_remote_code_logits_match_every_task(exported, arch):
    model, hf = exported[arch]
    for k, task in enumerate(TASKS):
        b = eval_batch(arch, k)
        with torch.no_grad(), hf.use_task(task):
            theirs = hf(**hf_inputs(arch, b), decoder_input_ids=b.decoder_input).logits
        torch.testing.assert_close(theirs, forward(model, arch, b), atol=1e-4, rtol=1e-4)
    b = eval_batch(arch, 0)
    b.tgt_task = torch.full_like(b.src_task, 2)
    with torch.no_grad(), hf.use_task("copy->shift"):
        theirs = hf(**hf_inputs(arch, b), decoder_input_ids=b.decoder_input).logits
    torch.testing.assert_close(theirs, forward(model, arch, b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["text", "s2t"])
def test_remote_code_greedy_generate_takes_the_task(exported, arch):
    model, hf = exported[arch]
    for k, task in enumerate(TASKS):
        b = eval_batch(arch, k, batch_size=6)
        ours = generate(model, b, SearchConfig(beam=1, max_len_b=20)).tokens
        with torch.no_grad():
            out = hf.generate(**hf_inputs(arch, b), task=task, num_beams=1, max_new_tokens=21)
        assert out[:, 0].eq(4 + k).all(), "generate() must start from the task's tag"
        assert hf_tokens(out, model.config.eos_token_id) == ours


def test_remote_code_beam_generate(exported):
    model, hf = exported["text"]
    for k, task in enumerate(TASKS):
        b = eval_batch("text", k, batch_size=6)
        ours = generate(model, b, SearchConfig(beam=4, max_len_b=20)).tokens
        with torch.no_grad():
            out = hf.generate(**hf_inputs("text", b), task=task, num_beams=4, max_new_tokens=21)
        assert hf_tokens(out, model.config.eos_token_id) == ours


def test_remote_code_refuses_missing_or_unknown_task(exported):
    _, hf = exported["text"]
    b = eval_batch("text", 0)
    with pytest.raises(ValueError, match="pass task="):
        hf.generate(**hf_inputs("text", b), max_new_tokens=3)
    with pytest.raises(ValueError, match="unknown task 'klingon'"):
        hf.generate(**hf_inputs("text", b), task="klingon", max_new_tokens=3)
