"""Every shipped recipe config trains: configs/{asr8,st8,domains,mt}.yaml, each on a tiny corpus of its kind.

The corpora are the tests' own (tests/data/data_helpers.py: espeak-ng speech for de/fr x ui/cli, and the same
rows as text), so no recipe download happens here; what is checked is the config itself: it loads, builds its
model at the shipped size, and two optimizer steps give a finite loss and a checkpoint. Only what a tiny corpus
cannot hold is overridden (data.manifest, model.vocab_size, the step budget, the output dir).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from data_helpers import make_rows

from hs_scale.config import load_config
from hs_scale.data import load_tokenizer
from hs_scale.training.run import train

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def tiny_text_corpus(tmp_path_factory):
    from data_pipelines.build import build_from_rows

    out = str(tmp_path_factory.mktemp("tiny_text") / "corpus")
    rows = make_rows(tgt="en")
    # English -> X as well: the mt recipe trains both directions.
    rows += [dict(r, lang="en", tgt_lang=r["lang"], text=r["translation"], translation=r["text"]) for r in rows]
    build_from_rows(rows, out, modality="text", shard_size=8, workers=1, vocab_size=150)
    return out


@pytest.mark.parametrize("name", ["asr8", "st8", "domains", "mt"])
def test_recipe_config_trains(name, tiny_corpus, tiny_text_corpus, tmp_path):
    corpus = tiny_text_corpus if name == "mt" else tiny_corpus
    out = tmp_path / "run"
    cfg = load_config(CONFIGS / f"{name}.yaml", [
        f"--data.manifest={corpus}", f"--model.vocab_size={load_tokenizer(corpus).vocab_size}",
        "--data.num_workers=0", "--data.max_frames_per_batch=3000", "--data.max_tokens_per_batch=400",
        "--train.steps=2", "--train.warmup_steps=1", "--train.eval_every=2", "--train.save_every=2",
        "--train.log_every=1", "--train.progress_bar=false", "--train.threads=1", f"--train.output_dir={out}",
    ])
    shipped = load_config(CONFIGS / f"{name}.yaml")
    assert (cfg.model.d_model, cfg.model.encoder_layers, cfg.selection.pool_heads) == (
        shipped.model.d_model, shipped.model.encoder_layers, shipped.selection.pool_heads)  # the shipped model
    train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert any(r["kind"] == "eval" for r in records)
    assert list((out / "checkpoints").glob("step_*"))
