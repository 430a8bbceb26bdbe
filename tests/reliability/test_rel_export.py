"""Export / import / evaluate with hostile arguments: a non-empty --out is never mixed with a new model, --out that is a
file, duplicate task names and an unknown split are refused in one line; import-hf's output is a config that
`show-config` accepts and a verified starting point for `train.init_from`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from rel_helpers import TINY, flip_byte, one_error_line

from hs_scale.cli import main as cli_main
from hs_scale.export.cli import main_export, main_import

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    assert cli_main(["train", "--config", TINY, "--train.output_dir", str(out), "--train.steps", "2"]) == 0
    return out


def test_export_out_rules(run_dir, tmp_path, capsys):
    ckpt = str(run_dir / "checkpoints")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "preprocessor_config.json").write_text("{}")  # a stale file of another model
    assert main_export(["--checkpoint", ckpt, "--task", "copy", "--out", str(out)]) == 2
    assert f"--out {out} is not empty: pass --overwrite" in capsys.readouterr().err
    assert main_export(["--checkpoint", ckpt, "--task", "copy", "--out", str(out), "--overwrite"]) == 0
    assert not (out / "preprocessor_config.json").exists() and (out / "config.json").exists()  # replaced whole
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    afile = tmp_path / "file"
    afile.write_text("x")
    assert main_export(["--checkpoint", ckpt, "--task", "copy", "--out", str(afile)]) == 2
    assert f"--out {afile} is a file" in capsys.readouterr().err
    assert main_export(["--checkpoint", ckpt, "--task", "copy", "--out", str(tmp_path / "x"), "--task-names",
                        "copy,copy,shift,swap_pairs"]) == 2
    assert "--task-names lists ['copy'] more than once" in capsys.readouterr().err


def test_evaluate_unknown_split(run_dir, capsys):
    from hs_scale.evaluation.cli import main as evaluate

    assert evaluate(["--checkpoint", str(run_dir / "checkpoints"), "--split", "nosuch", "--beam", "1"]) == 2
    err = capsys.readouterr().err
    assert "--split 'nosuch'" in err and "'valid'" in err and "Traceback" not in err


def _dense_like_tiny(path: Path) -> None:
    """A random dense M2M100 with the tiny run's dimensions, saved with save_pretrained."""
    import transformers

    from hs_scale.config import load_config
    from hs_scale.models.hf_names import build_hf_config

    cfg = load_config(TINY)
    torch.manual_seed(0)
    hf = transformers.M2M100ForConditionalGeneration(build_hf_config(cfg.model))
    hf.save_pretrained(str(path))


def test_import_hf_output_is_a_verified_start_for_init_from(tmp_path, capsys):
    _dense_like_tiny(tmp_path / "dense")
    args = ["--model", str(tmp_path / "dense"), "--pool-size", "4", "--out", str(tmp_path / "up")]
    assert main_import([*args, "--tasks", "copy,reverse,copy"]) == 2
    assert "--tasks lists ['copy'] more than once" in capsys.readouterr().err
    assert main_import([*args, "--tasks", "copy,reverse,shift,swap_pairs"]) == 0
    up = tmp_path / "up"
    assert cli_main(["show-config", "--config", str(up / "config.yaml")]) == 0  # accepted as it is
    capsys.readouterr()

    # Train the synthetic task from the imported weights: its model/selection sections + the tiny run's others.
    sections = yaml.safe_load((up / "config.yaml").read_text())
    tiny = yaml.safe_load(Path(TINY).read_text())
    config = tmp_path / "from_import.yaml"
    config.write_text(yaml.safe_dump({**tiny, "model": sections["model"], "selection": sections["selection"]}))
    out = tmp_path / "run"
    base = ["train", "--config", str(config), "--train.output_dir", str(out), "--train.steps", "1",
            "--train.save_every", "0"]
    flip_byte(up / "model.safetensors")
    assert cli_main([*base, "--train.init_from", str(up)]) == 2  # verified like a checkpoint
    assert "model.safetensors fails its checksum" in one_error_line(capsys.readouterr().err)
    flip_byte(up / "model.safetensors")  # flipped back: intact again
    assert cli_main([*base, "--train.init_from", str(up), "--train.lr", "1e-12"]) == 0
    from safetensors.torch import load_file

    from hs_scale.checkpoint import load_full_model_state

    imported = load_file(str(up / "model.safetensors"))
    _, trained = load_full_model_state(out / "checkpoints")
    weights = {n: t for n, t in imported.items() if not n.endswith((".draws", ".temperature"))}  # not buffers
    assert len(weights) > 10
    for name, tensor in weights.items():  # one step at lr 1e-12 from the imported weights: still them
        torch.testing.assert_close(trained[name], tensor, atol=1e-8, rtol=0, msg=name)
