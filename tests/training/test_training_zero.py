"""DeepSpeed ZeRO-2 under the trainer (torchrun, 2 CPU ranks): its checkpoints hold the layout-free optimizer state.

ZeRO 1/2 steps flat fp32 partitions of the client AdamW; hs_scale.training.zero_state presents them per parameter
name, so a ZeRO-2 checkpoint resumes bitwise under ZeRO-2, and it and a megatron_ddp checkpoint read each other.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install deepspeed, see docs/stack.md)")

from hs_scale.checkpoint import CheckpointManager, load_full_model_state  # noqa: E402
from hs_scale.checkpoint import state as ckpt_state  # noqa: E402
from hs_scale.checkpoint.safe_io import SafeFileSystemReader, read_dcp_metadata  # noqa: E402

STEPS, SAVE_AT = 8, 4
# warm-up 2 of 8 steps: the lr moves every step, so a wrong lr or optimizer state shows in the losses at once.
COMMON = ["--config", "configs/synthetic.yaml", f"--train.steps={STEPS}", f"--train.save_every={SAVE_AT}",
          "--train.log_every=1", "--train.progress_bar=false", "--train.threads=1", "--train.eval_every=0",
          "--train.warmup_steps=2", "--train.keep_last=5", "--synthetic.batch_size=16", "--model.dropout=0.1"]
ZERO2 = ["--parallel.engine=deepspeed", "--parallel.zero_stage=2"]
ZERO1 = ["--parallel.engine=deepspeed", "--parallel.zero_stage=1"]
MEGATRON = ["--parallel.engine=megatron_ddp"]


def _run(out: Path, *overrides: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "hs_scale.cli", "train", *COMMON, f"--train.output_dir={out}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc.stdout


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def _lrs(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in rows if r["kind"] == "train"}


def _step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:09d}"


def _resume_from(src: Path, step: int, dst: Path) -> None:
    """dst starts as `src` stopped right after its step-`step` checkpoint: only that checkpoint, `latest` on it."""
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(_step_dir(src, step), _step_dir(dst, step))
    (dst / "checkpoints" / "latest").write_text(_step_dir(dst, step).name + "\n")


def _optim_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every `optim.*` tensor of a checkpoint, read in this (non-distributed) process."""
    targets, _ = ckpt_state.consolidate(read_dcp_metadata(path), prefix="optim.")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(targets, storage_reader=SafeFileSystemReader(path), no_dist=True)
    return targets


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero")
    _run(root / "zero2", *ZERO2)
    _run(root / "megatron", *MEGATRON)
    return root


@pytest.mark.slow
def test_zero2_resume_is_bitwise_identical(runs, tmp_path):
    reference, resumed = runs / "zero2", tmp_path / "resumed"
    _resume_from(reference, SAVE_AT, resumed)
    assert f"resumed from step {SAVE_AT}" in _run(resumed, *ZERO2)

    ref, got = _losses(reference), _losses(resumed)
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert sorted(got) == list(range(SAVE_AT + 1, STEPS + 1))
    for step, loss in got.items():
        assert loss == ref[step], (step, loss, ref[step])  # bitwise: same floats
    assert _lrs(resumed) == {s: lr for s, lr in _lrs(reference).items() if s > SAVE_AT}

    _, ref_state = load_full_model_state(reference / "checkpoints")
    _, got_state = load_full_model_state(resumed / "checkpoints")
    assert ref_state.keys() == got_state.keys()
    for name in ref_state:
        assert torch.equal(ref_state[name], got_state[name]), name
    ref_optim, got_optim = _optim_tensors(_step_dir(reference, STEPS)), _optim_tensors(_step_dir(resumed, STEPS))
    assert ref_optim.keys() == got_optim.keys()
    for key in ref_optim:
        assert torch.equal(ref_optim[key], got_optim[key]), key


@pytest.mark.slow
def test_zero2_matches_megatron_ddp_and_checkpoints_share_one_format(runs, tmp_path):
    zero, megatron = runs / "zero2", runs / "megatron"
    # Same global batch and loss normalisation: the same curve (and the lr DeepSpeed applies is the scheduler's).
    z, m = _losses(zero), _losses(megatron)
    assert sorted(z) == sorted(m) == list(range(1, STEPS + 1))
    for step in z:
        assert abs(z[step] - m[step]) <= 1e-6, (step, z[step], m[step])
    assert _lrs(zero) == _lrs(megatron)

    # The ZeRO-2 checkpoint holds the same optimizer entries as megatron_ddp's: exp_avg / exp_avg_sq / step per name.
    zo, mo = _optim_tensors(_step_dir(zero, SAVE_AT)), _optim_tensors(_step_dir(megatron, SAVE_AT))
    assert zo.keys() == mo.keys()
    assert {k.split(".")[1] for k in zo} == {"exp_avg", "exp_avg_sq", "step"}
    for key in zo:
        assert zo[key].shape == mo[key].shape and zo[key].dtype == mo[key].dtype == torch.float32, key
        torch.testing.assert_close(zo[key], mo[key], rtol=1e-4, atol=1e-9, msg=key)

    # Each engine resumes the other's step-4 checkpoint and continues on the other's curve (ZeRO-1 too).
    for src, engine, curve in ((zero, MEGATRON, m), (megatron, ZERO2, z), (zero, ZERO1, z)):
        out = tmp_path / f"from_{src.name}_{engine[-1].rpartition('=')[2]}"
        _resume_from(src, SAVE_AT, out)
        assert f"resumed from step {SAVE_AT}" in _run(out, *engine)
        got = _losses(out)
        assert sorted(got) == list(range(SAVE_AT + 1, STEPS + 1))
        for step, loss in got.items():
            assert abs(loss - curve[step]) <= 1e-6, (src.name, engine, step, loss, curve[step])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*per-rank state .* is not restored")
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_zero2_checkpoint_loads_into_one_process(runs):
    """One process, a plain torch AdamW: every parameter gets the checkpoint's full exp_avg / exp_avg_sq / step."""
    from hs_scale.config import load_config
    from hs_scale.models import build_model
    from hs_scale.training.data_source import SyntheticSource
    from hs_scale.training.optim import build_optimizer

    path = _step_dir(runs / "zero2", SAVE_AT)
    cfg = load_config(str(runs / "zero2" / "config.yaml"), [])
    source = SyntheticSource(cfg.synthetic, 0, 1, cfg.train.grad_accum)
    model = build_model(cfg.model, cfg.selection, num_tasks=len(source.task_names))
    optimizer, scheduler = build_optimizer(model, cfg.train)
    step, _ = CheckpointManager(path.parent).load(path, model, optimizer, scheduler)
    assert step == SAVE_AT
    saved = _optim_tensors(path)
    names = {id(p): n for n, p in model.named_parameters()}
    stacked = ckpt_state.stack_layers(saved, ckpt_state.consolidate(read_dcp_metadata(path), prefix="optim.")[1],
                                      "optim.")
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state[p]
            assert float(st["step"]) == SAVE_AT
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(st[key], stacked[f"{key}.{names[id(p)]}"]), (key, names[id(p)])
    assert scheduler.last_epoch == SAVE_AT
