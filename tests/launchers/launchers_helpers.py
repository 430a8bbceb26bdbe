"""Fixtures for the launcher tests: the README walk (its torchrun run is the reference curve), the tiny job, a local
Ray head, a local two-node Slurm cluster.

Every test starts the real tool (torchrun, deepspeed, ray, sbatch) on loopback, bounded in time, and cleans up only
what it started (by PID, or by the unique temp dir / SLURM_CONF its processes carry - never `ray stop`/pkill).
Missing tools skip with the reason; they never pass silently.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from hs_scale.launch.procs import kill_marked

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "launchers" / "tiny_launch.yaml"


# The README runs' budget (tests/launchers/readme_walk.py appends it to every training command) and the job the
# reference curve comes from: configs/synthetic.yaml as the README's torchrun laptop line runs it.
REF_STEPS = 8
BUDGET = [f"--train.steps={REF_STEPS}", "--train.save_every=4", f"--train.eval_every={REF_STEPS}",
          "--train.log_every=1", "--train.warmup_steps=2", "--train.threads=1"]
REF_CONFIG = REPO / "configs" / "synthetic.yaml"
REF_OVERRIDES = ["--train.device", "cpu", "--train.threads", "1", *BUDGET]


def launch_env(**extra) -> dict[str, str]:
    """Environment for a launched job: the repo importable, one thread per rank, no GPUs, our python first."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1",
           "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0", "PYTHON": sys.executable,
           "HS_LAUNCHERS": str(REPO / "launchers")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{REPO}:{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_tool(cmd: list[str], timeout: float, env: dict | None = None, cwd: Path = REPO, log: Path | None = None):
    """Run a launcher in its own session; on timeout kill its whole process group. Returns (rc, output)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        out += f"\n[test] killed after {timeout}s"
        rc = -9
    else:
        rc = proc.returncode
    if log is not None:
        log.write_text(out)
    return rc, out


def train_losses(output_dir: Path | str) -> list[tuple[int, float]]:
    """(step, loss) of every kind=train line of metrics.jsonl, in file order (restarts show as step going back)."""
    path = Path(output_dir) / "metrics.jsonl"
    assert path.exists(), f"no metrics.jsonl in {output_dir}"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train"]


def final_curve(output_dir: Path | str) -> dict[int, float]:
    """step -> loss as it stands in the final state (the last logged value of each step)."""
    return dict(train_losses(output_dir))


def checkpoints(output_dir: Path | str) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def assert_curves_match(got: dict[int, float], want: dict[int, float], rtol: float = 1e-4, what: str = "") -> None:
    assert sorted(got) == sorted(want), f"{what}: steps differ: {sorted(got)} vs {sorted(want)}"
    bad = {s: (got[s], want[s]) for s in want if abs(got[s] - want[s]) > rtol * max(1.0, abs(want[s]))}
    assert not bad, f"{what}: losses differ at steps {bad}"


# ------------------------------------------------------------------------------------------------ reference run
@pytest.fixture(scope="session")
def readme_walk(tmp_path_factory):
    """The README's quick start and launch sections, run in order once per session (tests/launchers/readme_walk.py):
    its torchrun, DeepSpeed and Ray runs are the launcher tests' runs."""
    from readme_walk import walk

    reason = _ray_missing() or (None if shutil.which("deepspeed") else "the `deepspeed` launcher is not installed")
    if reason:
        pytest.skip(reason)
    return walk(tmp_path_factory.mktemp("readme"))


@pytest.fixture(scope="session")
def torchrun_reference(readme_walk) -> dict[int, float]:
    """The README's torchrun laptop run (2 CPU ranks, REF_CONFIG + REF_OVERRIDES): the loss curve every launcher
    must reproduce."""
    step = readme_walk.step("launchers/torchrun.sh")
    assert step.rc == 0, step.output[-4000:]
    curve = final_curve(readme_walk.cwd / "runs/torchrun_synthetic")
    assert len(curve) == REF_STEPS, curve
    return curve


# ------------------------------------------------------------------------------------------------ Ray
def _ray_missing() -> str | None:
    try:
        import ray  # noqa: F401
        import ray.train.torch  # noqa: F401
    except ImportError as err:
        return f"ray[train] not installed ({err}): pip install 'ray[default,train]>=2.60,<2.61'"
    if shutil.which("ray") is None and not (Path(sys.executable).parent / "ray").exists():
        return "the `ray` command is not on PATH"
    return None


@pytest.fixture(scope="module")
def local_ray():
    """A Ray head started for this module: temp dir, free non-default ports, dashboard on 127.0.0.1."""
    reason = _ray_missing()
    if reason:
        pytest.skip(reason)
    from hs_scale.launch.local_ray import LocalRay

    root = Path(tempfile.mkdtemp(prefix="hsray", dir="/tmp"))  # short: Ray's unix socket paths live under it
    head = LocalRay(root, num_cpus=2)
    head.start(timeout=120)
    try:
        yield head
    finally:
        head.stop()
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ Slurm
def _slurm_missing() -> str | None:
    from hs_scale.launch.local_slurm import missing_binaries

    missing = missing_binaries()
    if missing:
        return (f"Slurm/munge not installed (missing {missing}); `make test` installs them as root with apt "
                "(launchers/install_test_deps.sh)")
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (slurmd runs job steps as their user)"
    return None


@pytest.fixture(scope="module")
def local_slurm():
    """A real two-node Slurm cluster (munged, slurmctld, slurmd n1 + n2) on 127.0.0.1, torn down after the module."""
    reason = _slurm_missing()
    if reason:
        pytest.skip(reason)
    from hs_scale.launch.local_slurm import LocalSlurm

    root = Path(tempfile.mkdtemp(prefix="hsslurm", dir="/tmp"))
    cluster = LocalSlurm(root, nodes=2)
    cluster.start(timeout=60)
    try:
        yield cluster
    finally:
        cluster.stop()
        kill_marked(str(root), grace=3)
        shutil.rmtree(root, ignore_errors=True)
