"""`hs-scale heads importance|adapt|plot` end to end on a tiny saved Llama (no hub)."""

import json

import torch
from lahis_helpers import save_lm_with_tokenizer
from safetensors.torch import load_file

from hs_scale.analysis.lahis import lahis_scores
from hs_scale.cli import main

TEXTS = {
    "en": ["the cat sat on the mat", "a dog runs in the park", "we read a book today", "the sun is warm"] * 2,
    "ru": ["кошка сидит на коврике", "собака бежит в парке", "мы читаем книгу", "солнце тёплое"] * 2,
    "el": ["η γάτα κάθεται στο χαλί", "ένας σκύλος τρέχει", "διαβάζουμε ένα βιβλίο", "ο ήλιος είναι ζεστός"] * 2,
}


def test_importance_adapt_plot(tmp_path, capsys):
    model, tok = save_lm_with_tokenizer(str(tmp_path / "lm"), [t for v in TEXTS.values() for t in v])
    args = []
    for lang, lines in TEXTS.items():
        path = tmp_path / f"{lang}.txt"
        path.write_text("\n".join(lines) + "\n")
        args.append(f"{lang}={path}")
    out = tmp_path / "out"
    assert main(["heads", "importance", "--model", str(tmp_path / "lm"), "--texts", *args, "--out", str(out),
                 "--heldout", "0.25", "--quantile", "0.8", "--batch-size", "3"]) == 0
    scores = load_file(str(out / "scores.safetensors"))
    # The CLI's numbers are those of the library on the same (tokenized, non-held-out) documents.
    en_docs = [tok(t).input_ids for t in TEXTS["en"][:6]]
    torch.testing.assert_close(scores["en"], lahis_scores(model.eval(), en_docs)["scores"], rtol=1e-4, atol=1e-9)
    heads = json.loads((out / "heads.json").read_text())
    assert heads["min_languages"] == 3 and set(heads["specific"]) == {"en", "ru", "el"}
    ablation = json.loads((out / "ablation.json").read_text())
    assert len(ablation["ratio"]) == 3
    assert (out / "figures" / "ru.png").exists() and (out / "figures" / "ablation.png").exists()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["specific"].keys() == {"en", "ru", "el"}

    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": t, "answer": " " + t}) + "\n" for t in TEXTS["ru"][:4]))
    adapted = tmp_path / "adapt"
    assert main(["heads", "adapt", "--model", str(tmp_path / "lm"), "--scores", str(out), "--language", "ru",
                 "--train", str(task), "--eval", str(task), "--out", str(adapted), "--fraction", "0.25",
                 "--lr", "0.1", "--save-model"]) == 0
    summary = json.loads((adapted / "adapt.json").read_text())
    assert len(summary["heads"]) == 2 and summary["eval_loss_after"] < summary["eval_loss_before"]
    assert (adapted / "mask.safetensors").exists() and (adapted / "model" / "config.json").exists()

    assert main(["heads", "plot", "--scores", str(out), "--out", str(tmp_path / "figs")]) == 0
    assert (tmp_path / "figs" / "all_languages.png").exists()


def test_bad_input_is_one_line(tmp_path, capsys):
    assert main(["heads", "importance", "--model", str(tmp_path), "--texts", "en", "--out", str(tmp_path)]) == 2
    assert "LANG=FILE" in capsys.readouterr().err
    assert main(["heads", "importance", "--model", str(tmp_path / "none"), "--texts", f"en={tmp_path}/x.txt",
                 "--out", str(tmp_path)]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["heads", "nope"]) == 2


def test_plot_of_a_selection_checkpoint(tmp_path):
    """Figs 3-4 of a head-selection encoder-decoder checkpoint, through hs_scale.selection.analysis."""
    from hs_scale.checkpoint import CheckpointManager
    from hs_scale.config import Config
    from hs_scale.data.synthetic import SyntheticConfig
    from hs_scale.models import ModelConfig, build_model
    from hs_scale.selection.config import SelectionConfig

    synth = SyntheticConfig(rules=["copy", "reverse", "shift"], num_symbols=8, min_len=3, max_len=6, batch_size=4)
    model_cfg = ModelConfig(arch="text", d_model=16, encoder_layers=1, decoder_layers=1, num_heads=2, ffn_dim=16,
                            vocab_size=synth.vocab_size, dropout=0.0)
    selection = SelectionConfig(strategy="group", pool_heads=4)
    torch.manual_seed(0)
    model = build_model(model_cfg, selection, num_tasks=3)
    CheckpointManager(tmp_path / "ckpt").save(1, model, config=Config(model=model_cfg, selection=selection,
                                                                       synthetic=synth).to_dict())
    assert main(["heads", "plot", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "figs")]) == 0
    types = model.head_selection_table()
    for attn_type in types:
        assert (tmp_path / "figs" / attn_type / "shared_heads.png").exists()
        assert (tmp_path / "figs" / attn_type / "load_histogram.png").exists()
    assert (tmp_path / "figs" / "all" / "shared_heads.png").exists() == (len(types) > 1)
    assert main(["heads", "plot", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
