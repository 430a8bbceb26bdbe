"""`hs-scale demo` end to end on a tiny spoken-numbers corpus: both models train, evaluate, and are reported."""

from __future__ import annotations

import json

import pytest

from data_pipelines.spoken import KINDS, phrase, spoken_rows


def test_spoken_phrases_differ_by_language_and_splits_do_not_overlap():
    import numpy as np

    rng = np.random.default_rng(0)
    assert {k: bool(phrase(k, "de", rng)[0]) for k in KINDS} == {k: True for k in KINDS}
    rows = spoken_rows(("de", "fr"), {"train": 40, "dev": 5, "test": 5}, ("clean", "noisy"))
    for lang in ("de", "fr"):
        by_split = {s: {r["text"] for r in rows if r["lang"] == lang and r["split"] == s}
                    for s in ("train", "dev", "test")}
        assert not (by_split["train"] & by_split["test"]) and not (by_split["dev"] & by_split["test"])
        assert sum(r["lang"] == lang and r["split"] == "test" for r in rows) == 5
    de = {r["text"] for r in rows if r["lang"] == "de"}
    fr = {r["text"] for r in rows if r["lang"] == "fr"}
    assert not de & fr  # the languages say the same things differently
    assert {r["domain"] for r in rows} == {"clean", "noisy"}


@pytest.mark.slow
def test_demo_trains_both_models_and_reports_the_winner(tmp_path):
    from data_pipelines.cli import main as prepare_data
    from hs_scale.demo import main as demo

    out = tmp_path / "demo"
    assert prepare_data(["--recipe", "demo", "--out", str(out / "corpus"), "--size", "60", "--dev-size", "6",
                         "--test-size", "6", "--workers", "1"]) == 0
    tiny = ["--train.steps=4", "--train.save_every=2", "--train.eval_every=2", "--train.warmup_steps=2",
            "--model.encoder_layers=1", "--model.decoder_layers=1", "--model.d_model=32", "--model.ffn_dim=64",
            "--model.conv_channels=32"]
    assert demo(["--out", str(out), "--average-last", "2", "--beam", "2", *tiny]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["models"]) == {"group", "shared"} and summary["steps"] == 4
    for model in summary["models"].values():
        assert set(model["wer"]) == {"de", "es", "fr", "average"}
        assert all(v >= 0 for v in model["wer"].values())
    assert summary["winner"] in {"group", "shared", "tie"}
    assert {"build corpus", "total"} <= set(summary["wall_s"])
    report = (out / "report.md").read_text()
    assert "**Result:" in report and "| average |" in report
    assert (out / "learning_curves.png").stat().st_size > 1000
    assert list((out / "group" / "heatmaps").glob("*.png"))
    # the baseline really is the shared-attention model: no selectors in its config
    assert "enabled: false" in (out / "shared" / "config.yaml").read_text()
