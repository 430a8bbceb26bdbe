"""Exact resume: a run killed with SIGKILL and resumed == the uninterrupted run, bitwise (fp32, CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hs_scale.checkpoint import load_full_model_state

STEPS = 40
ARGS = ["--config", "configs/synthetic.yaml", f"--train.steps={STEPS}", "--train.save_every=5", "--train.log_every=1",
        "--train.progress_bar=false", "--train.threads=1", "--model.dropout=0.1", "--synthetic.batch_size=16",
        "--train.eval_every=0"]


def _train_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "hs_scale.cli", "train", *ARGS, f"--train.output_dir={out}"]


def _losses(out: Path) -> dict[int, list[float]]:
    per_step: dict[int, list[float]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            per_step.setdefault(record["step"], []).append(record["loss"])
    return per_step


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (out / "metrics.jsonl").exists() and max(_losses(out), default=0) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with {proc.returncode}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout_s} s")


@pytest.mark.slow
def test_sigkill_and_resume_is_bitwise_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    subprocess.run(_train_cmd(reference), check=True, env=env, capture_output=True, timeout=600)

    proc = subprocess.Popen(_train_cmd(interrupted), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_step(interrupted, STEPS // 2 + 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = max(_losses(interrupted))
    assert killed_at < STEPS, "the run finished before it was killed; the test proves nothing"
    resumed = subprocess.run(_train_cmd(interrupted), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step" in resumed.stdout

    ref, got = _losses(reference), _losses(interrupted)
    assert sorted(ref) == list(range(1, STEPS + 1)) == sorted(got)
    for step, losses in got.items():
        assert all(loss == ref[step][0] for loss in losses), (step, losses, ref[step])  # bitwise: same floats
    assert any(len(v) == 2 for v in got.values()), "no step was re-run after the kill: resume point untested"
    # metrics.jsonl says which records are recomputed steps: a resume marker, then "recomputed": true on each.
    rows = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    (marker,) = [r for r in rows if r["kind"] == "resume"]
    after = rows[rows.index(marker) + 1:]
    assert marker["recomputed_until"] == killed_at
    assert {r["step"] for r in after if r.get("recomputed")} == set(range(marker["step"] + 1, killed_at + 1))

    _, ref_state = load_full_model_state(reference / "checkpoints")
    _, got_state = load_full_model_state(interrupted / "checkpoints")
    assert ref_state.keys() == got_state.keys()
    for name in ref_state:
        assert torch.equal(ref_state[name], got_state[name]), name
