"""Shared pieces of the fault-injection suite: the tiny job, running `hs-scale` as a user would, reading results.

Every run uses tests/launchers/tiny_launch.yaml (the synthetic task, d_model 32, one thread per rank).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "tests" / "launchers" / "tiny_launch.yaml")


def env() -> dict[str, str]:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    e["PYTHONPATH"] = f"{REPO}:{e['PYTHONPATH']}" if e.get("PYTHONPATH") else str(REPO)
    e.pop("HS_SCALE_TRACEBACK", None)
    for var in ("HS_SCALE_RUN_ID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):  # no inherited incarnation id
        e.pop(var, None)
    return e


def train_cmd(out: Path, *overrides: str, nproc: int = 1) -> list[str]:
    args = ["-m", "hs_scale.cli", "train", "--config", TINY, "--train.output_dir", str(out), *overrides]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc-per-node={nproc}", *args]


def run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """Start in its own session (so a test can signal exactly it, and clean up its whole group)."""
    fh = log.open("w")
    return subprocess.Popen(cmd, env=env(), stdout=fh, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            start_new_session=True)


def stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def records(out: Path, kind: str | None = None) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r["kind"] == kind]


def final_losses(out: Path) -> dict[int, float]:
    """step -> loss of the last train record of each step (a resumed run logs recomputed steps again)."""
    return {r["step"]: r["loss"] for r in records(out, "train")}


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if max((r["step"] for r in records(out, "train")), default=0) >= step:
                return
        except ValueError:  # a line being written
            pass
        if proc.poll() is not None:
            raise AssertionError(f"the run exited early with {proc.returncode}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def one_error_line(stderr: str) -> str:
    """The `error: ...` line a refused command prints; asserts there is exactly one and no traceback."""
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
