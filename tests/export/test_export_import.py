"""import-hf (upcycling): a dense Speech2Text / M2M100 directory -> head-selection model with the same outputs."""

from __future__ import annotations

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

from export_helpers import eval_batch, forward, hf_inputs, model_cfg  # noqa: E402

from hs_scale.export import ExportError, import_dense  # noqa: E402
from hs_scale.export.cli import main_import  # noqa: E402
from hs_scale.models import build_model  # noqa: E402
from hs_scale.models.hf_names import build_hf_config  # noqa: E402
from hs_scale.selection.config import SelectionConfig  # noqa: E402

HF_CLASS = {"s2t": "Speech2TextForConditionalGeneration", "text": "M2M100ForConditionalGeneration"}
TASKS = ["de", "fr", "es"]


def dense_dir(arch: str, path) -> object:
    """A random dense HF model saved with save_pretrained (every tensor random, so name swaps would show)."""
    torch.manual_seed(0)
    hf = getattr(transformers, HF_CLASS[arch])(build_hf_config(model_cfg(arch))).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    hf.save_pretrained(str(path))
    return transformers.AutoModelForSeq2SeqLM if arch == "text" else None, hf


@pytest.mark.parametrize("strategy,pool", [("group", 8), ("subset", 12)])
@pytest.mark.parametrize("arch", ["text", "s2t"])
def test_upcycled_model_reproduces_dense_logits_for_every_task(arch, strategy, pool, tmp_path):
    _, hf = dense_dir(arch, tmp_path / "dense")
    perturb = 0.1 if strategy == "group" else 0.0
    model_config, selection, model = import_dense(
        str(tmp_path / "dense"), pool, TASKS, SelectionConfig(strategy=strategy), perturb_std=perturb
    )
    assert selection.pool_heads == pool and model.selectors["cross"].logits.shape == (3, 2, pool)
    for k in range(len(TASKS)):
        b = eval_batch(arch, 0)
        b.src_task = b.tgt_task = torch.full_like(b.src_task, k)
        with torch.no_grad():
            ours = forward(model, arch, b)
            theirs = hf(**hf_inputs(arch, b), decoder_input_ids=b.decoder_input).logits
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_import_cli_writes_a_loadable_model(tmp_path):
    _, hf = dense_dir("text", tmp_path / "dense")
    rc = main_import(["--model", str(tmp_path / "dense"), "--pool-size", "8", "--tasks", "de,fr",
                      "--out", str(tmp_path / "up"), "--no-select", "decoder_self"])
    assert rc == 0
    from safetensors.torch import load_file

    sections = yaml.safe_load((tmp_path / "up" / "config.yaml").read_text())
    assert sections["data"]["tasks"] == ["de", "fr"] and sections["selection"]["decoder_self"] is False
    model = build_model(model_cfg("text").__class__(**sections["model"]), SelectionConfig(**sections["selection"]), 2)
    model.load_state_dict(load_file(str(tmp_path / "up" / "model.safetensors")), strict=True)
    b = eval_batch("text", 0)
    b.src_task = b.tgt_task = torch.ones_like(b.src_task)
    with torch.no_grad():
        torch.testing.assert_close(forward(model.eval(), "text", b),
                                   hf(**hf_inputs("text", b), decoder_input_ids=b.decoder_input).logits,
                                   atol=1e-4, rtol=1e-4)


def test_import_refusals(tmp_path):
    dense_dir("text", tmp_path / "dense")
    with pytest.raises(ExportError, match="not a multiple"):
        import_dense(str(tmp_path / "dense"), 6, TASKS, SelectionConfig(strategy="subset"))
    cfg = transformers.AutoConfig.from_pretrained(str(tmp_path / "dense"))
    cfg.activation_function = "gelu"
    cfg.save_pretrained(str(tmp_path / "dense"))
    with pytest.raises(ExportError, match="activation_function='gelu'"):
        import_dense(str(tmp_path / "dense"), 8, TASKS)
    assert main_import(["--model", str(tmp_path / "dense"), "--pool-size", "8", "--tasks", "a",
                        "--out", str(tmp_path / "x")]) == 2
