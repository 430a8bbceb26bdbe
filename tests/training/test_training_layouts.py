"""The trainer entry point under torchrun: TP2 and PP2 give the single-process loss curve; checkpoints reshard."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

STEPS = 6
COMMON = ["--config", "configs/synthetic.yaml", f"--train.steps={STEPS}", "--train.log_every=1",
          "--train.progress_bar=false", "--train.threads=1", "--train.eval_every=0", "--model.dropout=0.0"]


def _losses(out) -> list[float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["kind"] == "train"]


def _run(out, nproc: int, *overrides: str) -> None:
    hs = ["-m", "hs_scale.cli", "train", *COMMON, f"--train.output_dir={out}", *overrides]
    cmd = [sys.executable, *hs] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *hs]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_tensor_and_pipeline_parallel_match_single_process(tmp_path):
    _run(tmp_path / "single", 1)
    _run(tmp_path / "tp2", 2, "--parallel.tensor_parallel=2")
    _run(tmp_path / "pp2", 2, "--parallel.pipeline_parallel=2")
    reference = _losses(tmp_path / "single")
    assert len(reference) == STEPS
    for layout in ("tp2", "pp2"):
        assert _losses(tmp_path / layout) == pytest.approx(reference, rel=1e-5), layout

    # A PP2 checkpoint evaluates in one process (consolidated), with the PP2 run's own final eval loss.
    from hs_scale.evaluation.cli import main as evaluate

    out = tmp_path / "eval.json"
    assert evaluate(["--checkpoint-root", str(tmp_path / "pp2" / "checkpoints"), "--split", "valid", "--beam", "1",
                     "--out", str(out)]) == 0
    assert json.loads(out.read_text())["total_sentences"] > 0
