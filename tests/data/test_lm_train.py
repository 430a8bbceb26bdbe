"""`hs-scale train` with model.arch=lm on a packed corpus built by the lm_help recipe: it learns, reports per-language
results, and a resumed run continues exactly (same losses as the uninterrupted run)."""

from __future__ import annotations

import json

import pytest
from lm_helpers import build_tiny_lm_corpus

from hs_scale.config import ConfigError, config_from_dict
from hs_scale.data import load_tokenizer
from hs_scale.training.run import train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_tiny_lm_corpus(str(tmp_path_factory.mktemp("lmt")))


def _cfg(corpus, out, steps, train_kw=None, **model):
    vocab = load_tokenizer(corpus).vocab_size
    return config_from_dict({
        "model": {"arch": "lm", "vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2,
                  "num_heads": 4, "num_kv_heads": 2, "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2,
                  **model},
        "selection": {"strategy": "group", "pool_heads": 8, "task_key": "lang"},
        "data": {"manifest": corpus, "modality": "lm", "task_key": "lang", "seq_len": 32, "max_tokens_per_batch": 128,
                 "num_workers": 0},
        "train": {"output_dir": str(out), "steps": steps, "lr": 1e-2, "warmup_steps": 1, "schedule": "constant",
                  "label_smoothing": 0.0, "log_every": 1, "eval_every": 0, "save_every": 3, "threads": 1,
                  "progress_bar": False, **(train_kw or {})},
    })


def _losses(out) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def test_lm_trains_and_resumes_exactly(corpus, tmp_path):
    result = train(_cfg(corpus, tmp_path / "a", 8))
    losses = _losses(tmp_path / "a")
    assert sorted(losses) == list(range(1, 9)) and losses[8] < losses[1] - 0.5  # it learns
    assert set(result["nll_per_task"]) == {"de", "en", "hi"} and result["ppl"] > 1
    assert (tmp_path / "a" / "selection.txt").read_text().startswith("decoder_self")
    train(_cfg(corpus, tmp_path / "b", 3))
    train(_cfg(corpus, tmp_path / "b", 8))  # resumes from the step-3 checkpoint (data cursor included)
    resumed = _losses(tmp_path / "b")
    assert all(resumed[s] == losses[s] for s in range(4, 9)), (resumed, losses)
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "resume"] == [3]  # it did resume, not restart
    train(_cfg(corpus, tmp_path / "c", 2, {"activation_checkpointing": True}))  # recomputed layers: same steps
    assert _losses(tmp_path / "c") == pytest.approx({s: losses[s] for s in (1, 2)}, rel=1e-6)


def test_lm_config_refusals(corpus, tmp_path):
    with pytest.raises(ConfigError, match="model.num_kv_heads=3 must divide"):
        _cfg(corpus, tmp_path, 1, num_kv_heads=3)
    with pytest.raises(ConfigError, match="parallel.tensor_parallel=4 does not divide model.num_kv_heads=2"):
        raw = _cfg(corpus, tmp_path, 1).to_dict()
        raw["parallel"]["tensor_parallel"] = 4
        config_from_dict(raw)
