"""DeepSpeed launcher, run for real: `deepspeed --num_gpus 2` (2 CPU ranks) via launchers/deepspeed/run.sh runs the
tiny job on the ZeRO-2 engine with torchrun's loss curve; the ds_config derived from the hs_scale config, and the
check of a hand-written one against it."""

from __future__ import annotations

import json
import shutil

import pytest
from launchers_helpers import REPO, TINY, assert_curves_match, checkpoints, final_curve, launch_env, run_tool

from hs_scale.config import load_config
from hs_scale.launch import ds_config
from hs_scale.launch.procs import free_ports

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
def test_deepspeed_launcher_zero2_matches_torchrun(tmp_path, torchrun_reference):
    if shutil.which("deepspeed") is None:
        pytest.skip("the `deepspeed` launcher is not installed (pip install deepspeed)")
    (port,) = free_ports(1)
    out = tmp_path / "run"
    rc, log = run_tool(["bash", str(REPO / "launchers/deepspeed/run.sh"), str(TINY), "--train.output_dir", str(out)],
                       timeout=300, env=launch_env(NUM_GPUS=2, ZERO_STAGE=2, MASTER_PORT=port),
                       log=tmp_path / "log.txt")
    assert rc == 0, log[-5000:]
    assert checkpoints(out), f"no checkpoint under {out}"
    assert_curves_match(final_curve(out), torchrun_reference, rtol=1e-4, what="deepspeed ZeRO-2 vs torchrun")
