"""DeepSpeed launcher, run for real: `deepspeed --num_gpus 2` (2 CPU ranks) via launchers/deepspeed/run.sh - the
README's DeepSpeed laptop line, run by the README walk (tests/launchers/test_readme.py) - trains on the ZeRO-2 engine
with torchrun's loss curve; the ds_config derived from the hs_scale config, and the check of a hand-written one
against it."""

from __future__ import annotations

import json

import pytest
from launchers_helpers import REPO, TINY, assert_curves_match, checkpoints, final_curve

from hs_scale.config import load_config
from hs_scale.launch import ds_config

ZERO2 = ["--parallel.engine", "deepspeed", "--parallel.zero_stage", "2"]


def test_ds_config_derived_from_hs_scale_config():
    cfg = load_config(str(TINY), ZERO2)
    derived = ds_config.derive(cfg)
    assert derived["zero_optimization"]["stage"] == 2
    assert derived["gradient_clipping"] == cfg.train.clip_norm
    assert derived["bf16"]["enabled"] is False
    assert ds_config.check(derived, cfg) == []


def test_ds_config_check_refuses_conflicts():
    cfg = load_config(str(TINY), ZERO2)
    bad = {**ds_config.derive(cfg), "zero_optimization": {"stage": 3}, "optimizer": {"type": "Adam"}}
    problems = ds_config.check(bad, cfg)
    assert any("zero_optimization.stage=3" in p for p in problems), problems
    assert any("'optimizer'" in p for p in problems), problems
    assert ds_config.check(ds_config.derive(cfg), load_config(str(TINY), [])), "engine=megatron_ddp must be refused"


def test_shipped_ds_config_example_is_consistent():
    shipped = json.loads((REPO / "launchers/deepspeed/ds_config.zero2.json").read_text())
    cfg = load_config(str(REPO / "configs/synthetic.yaml"), ZERO2)
    assert ds_config.check(shipped, cfg) == []


@pytest.mark.slow
def test_deepspeed_launcher_zero2_matches_torchrun(readme_walk, torchrun_reference):
    step = readme_walk.step("launchers/deepspeed/run.sh")
    assert step.rc == 0, step.output[-5000:]
    out = readme_walk.cwd / "runs/deepspeed_synthetic"
    assert checkpoints(out), f"no checkpoint under {out}"
    assert (out / "config.yaml").read_text().count("engine: deepspeed") == 1
    assert_curves_match(final_curve(out), torchrun_reference, rtol=1e-4, what="deepspeed ZeRO-2 vs torchrun")
