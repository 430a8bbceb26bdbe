"""The paper benchmark's plan (presets -> cells), config overrides, low-resource corpus derivation and summary,
without training anything."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks.paper.corpora import derive
from benchmarks.paper.plan import CONFIG_DIR, check_cell_config, expand, load_plan, variant_overrides
from benchmarks.paper.summary import summarize_experiment
from hs_scale.config import ConfigError


@pytest.mark.parametrize("preset", ["cpu", "gpu", "smoke"])
def test_every_preset_expands_into_valid_cell_configs(preset):
    plan = load_plan(CONFIG_DIR / f"{preset}.yaml")
    assert set(plan.experiments) == {"asr", "hsweep", "domains", "st", "mt"}
    for name in plan.experiments:
        cells = expand(plan, name)
        assert cells
        for cell in cells:
            cfg = check_cell_config(cell, "/nonexistent/corpus", 1000, "/tmp/x")  # validated, nothing read
            assert cfg.train.seed == cell.seed and cfg.train.threads == 1
            active = cfg.model.num_heads
            assert active == cell.active_heads
            if cell.variant in ("group", "subset"):
                assert cfg.selection.enabled and cfg.selection.strategy == cell.variant
                assert cfg.selection.pool_heads == cell.pool_heads
            else:
                assert not cfg.selection.enabled
    if preset != "smoke":
        assert plan.seeds >= 3


def test_cells_of_the_cpu_asr_experiment_and_the_sweep():
    plan = load_plan(CONFIG_DIR / "cpu.yaml")
    asr, sweep = expand(plan, "asr"), expand(plan, "hsweep")
    H = next(c.active_heads for c in asr if c.variant == "shared")
    per_seed = sorted((c.variant, c.pool_heads) for c in asr if c.seed == 1)
    assert per_seed == [("allheads", 2 * H), ("group", 2 * H), ("shared", H), ("subset", 2 * H)]
    assert {c.seed for c in asr} == {1, 2, 3}
    assert sorted({(c.variant, c.pool_heads) for c in sweep}) == [
        (v, p) for v in ("group", "subset") for p in (H, 2 * H, 4 * H)]
    # the sweep's H' = 2H cells are the main table's: same key, run once
    assert {c.key for c in asr if c.variant == "group"} <= {c.key for c in sweep}


def test_variant_overrides_and_unknown_fields_fail_loudly():
    assert variant_overrides("allheads", 8) == ["--selection.enabled=false", "--model.num_heads=8"]
    assert "--selection.strategy=subset" in variant_overrides("subset", 16)
    plan = load_plan(CONFIG_DIR / "smoke.yaml")
    plan.experiments["asr"].overrides["model.d_modle"] = 64
    with pytest.raises(ConfigError, match="did you mean model.d_model"):
        expand(plan, "asr")


def test_bad_plans_name_the_field(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("corpora: {c: {recipe: asr8}}\nexperiments: {asr: {corpus: nope, config: s2t_smoke.yaml}}\n")
    with pytest.raises(ConfigError, match="experiments.asr.corpus='nope'"):
        load_plan(bad)
    bad.write_text("corpora: {c: {recipe: asr8, sizes: 3}}\n")
    with pytest.raises(ConfigError, match="corpora.c.sizes: unknown field"):
        load_plan(bad)
    bad.write_text("corpora: {c: {recipe: asr8}}\nexperiments: {asr: {corpus: c, config: s2t_smoke.yaml, "
                   "variants: [shard]}}\n")
    with pytest.raises(ConfigError, match="choose from"):
        load_plan(bad)


def test_derive_keeps_a_fraction_of_the_low_resource_train_rows(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "shards").mkdir(parents=True)
    (src / "tokenizer.model").write_bytes(b"x")
    rows = [(s, lg, f"{lg}-{s}-{i}") for lg in ("de", "el") for s, n in (("train", 10), ("test", 3))
            for i in range(n)]
    pq.write_table(pa.table({"split": [r[0] for r in rows], "lang": [r[1] for r in rows],
                             "key": [r[2] for r in rows]}), src / "manifest.parquet")
    (src / "info.json").write_text(json.dumps({"splits": {"train": 20, "test": 6}}))
    derive(src, dst, {"el": 0.25})
    kept = pq.read_table(dst / "manifest.parquet").to_pydict()
    el_train = [k for k, s, lg in zip(kept["key"], kept["split"], kept["lang"], strict=True)
                if s == "train" and lg == "el"]
    assert el_train == ["el-train-0", "el-train-1", "el-train-2"]  # ceil(0.25 * 10), the first in manifest order
    assert len(kept["key"]) == 26 - 10 + 3  # every row but 7 of the 10 el train rows
    assert (dst / "shards").resolve() == (src / "shards").resolve()
    info = json.loads((dst / "info.json").read_text())
    assert info["splits"] == {"test": 6, "train": 13} and info["subsample"] == {"el": 0.25}
    with pytest.raises(ValueError, match=r"languages \['xx'\]"):
        derive(src, tmp_path / "bad", {"xx": 0.5})


def _cell(variant, seed, scores, pool=8):
    return {"variant": variant, "pool_heads": pool, "active_heads": 4, "seed": seed, "metric": "wer",
            "scores": scores, "average": sum(scores.values()) / len(scores), "train_s": 1.0, "eval_s": 1.0}


def test_summary_mean_std_and_verdict():
    cells = [_cell("shared", s, {"de": 50 + s, "fr": 60 + s}, pool=4) for s in (1, 2, 3)]
    cells += [_cell("group", s, {"de": 40 + s, "fr": 50 + s}) for s in (1, 2, 3)]
    s = summarize_experiment(cells, {"only_de": "de"})
    shared, group = s["rows"]["shared"], s["rows"]["group"]
    assert shared["mean"] == pytest.approx(57.0) and shared["std"] == pytest.approx(1.0)
    assert group["per_task"]["de"]["mean"] == pytest.approx(42.0)
    assert group["groups"]["only_de"]["mean"] == pytest.approx(42.0)
    assert s["direction"] == "lower"
    v = s["verdict"]
    assert v["gain"] == pytest.approx(10.0) and v["seed_std"] == pytest.approx(1.0) and v["group_beats_baseline"]
    # a gain inside the seed noise is not a win
    noisy = [_cell("group", s, {"de": avg, "fr": avg}) for s, avg in ((1, 45.0), (2, 57.0), (3, 60.0))]
    v = summarize_experiment(cells[:3] + noisy, {})["verdict"]
    assert v["gain"] > 0 and not v["group_beats_baseline"]
    assert math.isfinite(v["seed_std"])


def test_direction_groups_average_their_directions():
    scores = {"de->en": 20.0, "fr->en": 30.0, "en->de": 10.0, "en->fr": 12.0}
    cells = [{**_cell(v, 1, scores), "metric": "bleu"} for v in ("shared", "group")]
    s = summarize_experiment(cells, {"o2m": "en->*", "m2o": "*->en"})
    row = s["rows"]["group"]
    assert row["groups"]["o2m"]["mean"] == pytest.approx(11.0) and row["groups"]["m2o"]["mean"] == pytest.approx(25.0)
    assert s["direction"] == "higher" and row["std"] is None
    assert s["verdict"]["group_beats_baseline"] is None  # one seed: no claim
