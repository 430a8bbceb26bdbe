"""The bridge of issue 12: score a dense HF Llama's heads per language with LAHIS, upcycle it into a
head-selection pool whose selection starts from those scores, and check the pool (a) reproduces the dense model
for every language at step 0 and (b) gives each language's most important heads their own copy, as the
warm-start rule (hs_scale.models.lm.hf.selector_logits) says."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hs_scale.analysis.lahis import lahis_scores  # noqa: E402
from hs_scale.analysis.report import write_scores  # noqa: E402
from hs_scale.cli import main as hs_scale_main  # noqa: E402
from hs_scale.export.lm_cli import load_lm  # noqa: E402

LANGS = ("de", "fr")


def _dense(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    hf.save_pretrained(tmp_path / "dense")
    return hf


def test_lahis_scores_warm_start_an_upcycled_pool(tmp_path):
    hf = _dense(tmp_path)
    gen = torch.Generator().manual_seed(1)
    # Two "languages" as disjoint token ranges: their documents exercise different heads.
    docs = {"de": [torch.randint(3, 30, (12,), generator=gen).tolist() for _ in range(4)],
            "fr": [torch.randint(31, 61, (12,), generator=gen).tolist() for _ in range(4)]}
    results = {lang: lahis_scores(hf, docs[lang], max_tokens=16) for lang in LANGS}
    write_scores(str(tmp_path / "lahis"), results)

    rc = hs_scale_main(["import-hf", "--model", str(tmp_path / "dense"), "--pool-size", "8", "--tasks",
                        ",".join(LANGS), "--scores", str(tmp_path / "lahis" / "scores.safetensors"),
                        "--out", str(tmp_path / "pool")])
    assert rc == 0
    pool, tasks, _ = load_lm(tmp_path / "pool")
    assert tasks == list(LANGS)
    x = torch.randint(0, 61, (2, 9), generator=gen)
    with torch.no_grad():
        dense_logits = hf(x).logits
        for k in range(len(LANGS)):  # step 0: every language's sub-network is the dense model
            torch.testing.assert_close(pool(x, task_BL=torch.full((2,), k)), dense_logits, atol=1e-5, rtol=1e-5)

    # Warm start: with r = 2, a language's upper half of heads by LAHIS prefers its own copy (candidate 1), the
    # lower half the shared copy 0; the deterministic table shows which copy each slot takes.
    table = pool.head_selection_table()
    for k, lang in enumerate(LANGS):
        scores = results[lang]["scores"]
        ranks = scores.flatten().argsort().argsort().view_as(scores)
        for layer in range(scores.shape[0]):
            for h in range(scores.shape[1]):
                private = bool(ranks[layer, h] >= scores.numel() / 2)
                assert table[k][layer][h] == 2 * h + (1 if private else 0), (lang, layer, h)
