"""import-hf / export-hf for LMs end to end: dense Llama folder -> upcycled pool with LAHIS-style warm start ->
per-language LlamaForCausalLM that transformers loads with the same logits."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402
from test_lm_parity import random_hf, tiny_llama  # noqa: E402

from hs_scale.cli import main as hs_scale_main  # noqa: E402
from hs_scale.export.lm_cli import is_lm_folder, load_lm, main_export  # noqa: E402


def test_import_then_export_a_language(tmp_path, capsys):
    hf = random_hf(tiny_llama())
    hf.save_pretrained(tmp_path / "dense")
    scores = {lang: torch.rand(2, 4, generator=torch.Generator().manual_seed(i)) for i, lang in enumerate("abc")}
    save_file(scores, str(tmp_path / "lahis.safetensors"))
    assert is_lm_folder(tmp_path / "dense")
    rc = hs_scale_main(["import-hf", "--model", str(tmp_path / "dense"), "--pool-size", "8", "--tasks", "a,b,c",
                      "--scores", str(tmp_path / "lahis.safetensors"), "--out", str(tmp_path / "pool")])
    assert rc == 0, capsys.readouterr().err
    assert {"config.yaml", "model.safetensors", "COMPLETE"} <= {p.name for p in (tmp_path / "pool").iterdir()}
    assert is_lm_folder(tmp_path / "pool")
    model, tasks, _ = load_lm(tmp_path / "pool")
    assert tasks == ["a", "b", "c"] and model.candidates == 2
    x = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x, task_BL=torch.tensor([1, 2])), hf(x).logits, atol=1e-5, rtol=1e-5)

    argv = ["export-hf", "--checkpoint", str(tmp_path / "pool"), "--task", "b", "--out", str(tmp_path / "b")]
    assert hs_scale_main(argv) == 0  # the hs-scale commands hand LM folders to hs_scale.export.lm_cli
    exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "b").eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(x).logits, hf(x).logits, atol=1e-5, rtol=1e-5)
    assert main_export(["--checkpoint", str(tmp_path / "pool"), "--task", "zz", "--out", str(tmp_path / "z")]) == 2
    assert "unknown task 'zz'" in capsys.readouterr().err

    assert main_export(["--checkpoint", str(tmp_path / "pool"), "--all-tasks", "--out", str(tmp_path / "all")]) == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["a", "b", "c"]
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "all" / "b").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, exported(x).logits, atol=0, rtol=0)
