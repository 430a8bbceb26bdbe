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


# ------------------------------------------------------------------------------------------------ resume policy
TINY = "tests/launchers/tiny_launch.yaml"


def _cli(out: Path, *overrides: str) -> int:
    from hs_scale.cli import main

    return main(["train", "--config", TINY, "--train.output_dir", str(out), *overrides])


def _error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def six_steps(tmp_path):
    out = tmp_path / "run"
    assert _cli(out, "--train.steps", "6", "--train.save_every", "3") == 0
    return out


def test_resume_policy_never_and_must(six_steps, tmp_path, capsys):
    assert _cli(six_steps, "--train.steps", "8", "--train.resume", "never") == 2
    line = _error(capsys)
    assert "train.resume=never but" in line and "(newest: step 6)" in line, line
    assert _cli(tmp_path / "empty", "--train.resume", "must") == 2
    assert "train.resume=must but there is no checkpoint" in _error(capsys)
    assert _cli(six_steps, "--train.steps", "8", "--train.resume", "must") == 0
    assert "resumed from step 6" in capsys.readouterr().out


def test_resume_refuses_a_changed_config_naming_each_field(six_steps, capsys):
    before = (six_steps / "config.yaml").read_text()
    assert _cli(six_steps, "--train.steps", "8", "--selection.strategy", "subset", "--train.lr", "0.001") == 2
    line = _error(capsys)
    assert "selection.strategy: checkpoint 'group', now 'subset'" in line, line
    assert "train.lr: checkpoint 0.005, now 0.001" in line, line
    assert (six_steps / "config.yaml").read_text() == before  # the refused run did not overwrite it
    # Safe changes pass (steps raised, intervals, keep_last); an explicitly accepted one too.
    assert _cli(six_steps, "--train.steps", "8", "--train.log_every", "2", "--train.keep_last", "2",
                "--train.lr", "0.001", "--train.allow_config_change", "[train.lr]") == 0
    assert "lr: 0.001" in (six_steps / "config.yaml").read_text()


def test_fewer_steps_than_the_checkpoint_says_so(six_steps, capsys):
    assert _cli(six_steps, "--train.steps", "4") == 2
    line = _error(capsys)
    assert "is at step 6, past train.steps=4: nothing to train. Raise --train.steps above 6" in line, line
    assert _cli(six_steps, "--train.steps", "6") == 0
    assert "already at train.steps=6: only the final evaluation runs" in capsys.readouterr().out


def test_init_from_starts_a_new_run_from_weights(six_steps, tmp_path, capsys):
    new = tmp_path / "new"
    assert _cli(new, "--train.steps", "2", "--train.init_from", str(six_steps / "checkpoints"), "--train.lr",
                "1e-12") == 0
    assert "initialised from" in capsys.readouterr().out
    _, theirs = load_full_model_state(six_steps / "checkpoints")
    _, ours = load_full_model_state(new / "checkpoints")
    assert json.loads((new / "checkpoints" / "step_000000002" / "meta.json").read_text())["step"] == 2  # step 0 + 2
    for name, tensor in theirs.items():
        if not name.endswith((".draws", ".temperature")):
            torch.testing.assert_close(ours[name], tensor, atol=1e-8, rtol=0, msg=name)
    # Rerunning the same command resumes the new run (init_from only applies to step 0).
    assert _cli(new, "--train.steps", "3", "--train.init_from", str(six_steps / "checkpoints"), "--train.lr",
                "1e-12") == 0
    assert "resumed from step 2" in capsys.readouterr().out
    # Weights of another model are refused, naming the fields.
    assert _cli(tmp_path / "other", "--model.d_model", "64", "--train.init_from", str(six_steps)) == 2
    assert "model.d_model: checkpoint 32, now 64" in _error(capsys)


def test_init_from_a_dense_checkpoint_upcycles_it_into_the_selection_pool(tmp_path, capsys):
    """--train.init_from a shared-attention run into a run that selects heads: each dense head becomes H'/H
    candidates and, at step 0 in eval mode, every task computes the dense model's function (sparse upcycling)."""
    from hs_scale.config import load_config
    from hs_scale.data.synthetic import SyntheticTask
    from hs_scale.models import build_model

    dense_run, pooled_run = tmp_path / "dense", tmp_path / "pooled"
    assert _cli(dense_run, "--train.steps", "3", "--selection.enabled", "false") == 0
    # lr ~0 for the one step: the checkpoint then holds the step-0 (upcycled) weights.
    assert _cli(pooled_run, "--train.steps", "1", "--train.lr", "1e-12", "--train.init_from", str(dense_run),
                "--selection.pool_heads", "6", "--selection.strategy", "subset") == 0
    assert "initialised from" in capsys.readouterr().out
    _, dense_state = load_full_model_state(dense_run / "checkpoints")
    _, pooled_state = load_full_model_state(pooled_run / "checkpoints")
    cfg = load_config(TINY, ["--selection.pool_heads", "6", "--selection.strategy", "subset"])
    d = cfg.model.d_model // cfg.model.num_heads
    q_dense = dense_state["encoder.layers.0.self_attn.q_proj.weight"].view(2, 1, d, -1)
    torch.testing.assert_close(pooled_state["encoder.layers.0.self_attn.q_proj.weight"].view(2, 3, d, -1),
                               q_dense.expand(2, 3, d, -1), rtol=0, atol=1e-9)

    dense, pooled = (build_model(c.model, c.selection, 4).eval() for c in
                     (load_config(TINY, ["--selection.enabled", "false"]), cfg))
    dense.load_state_dict(dense_state, strict=False)
    pooled.load_state_dict({k: v for k, v in pooled_state.items() if not k.endswith((".draws", ".temperature"))},
                           strict=False)
    task = SyntheticTask(cfg.synthetic)
    with torch.no_grad():
        for t in range(4):
            b = task.batch(0, "valid", task=t)
            args = (b.source_tokens, b.decoder_input, b.src_task, b.tgt_task)
            torch.testing.assert_close(pooled(*args), dense(*args), atol=1e-5, rtol=0, msg=f"task {t}")
    # A pool that is not a multiple of the dense heads cannot be upcycled: refused, naming the field.
    assert _cli(tmp_path / "bad", "--train.init_from", str(dense_run), "--selection.pool_heads", "3",
                "--selection.strategy", "subset") == 2
    assert "selection.pool_heads=3 must be a multiple of 2" in _error(capsys)
