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
