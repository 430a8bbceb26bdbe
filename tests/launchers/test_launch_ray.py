"""Ray launcher, run for real: a local Ray head (started here, temp dir, free ports, dashboard on 127.0.0.1),
`launchers/ray/submit.sh` -> `ray job submit` -> hs_scale.launch.ray_train -> TorchTrainer with 2 CPU workers.

1. the README's Ray laptop lines (`ray start`, launchers/ray/submit.sh, run by the README walk,
   tests/launchers/test_readme.py): the job reaches SUCCEEDED, leaves a checkpoint in Ray's storage, and its loss
   curve is torchrun's;
2. a run in which one training worker is SIGKILLed mid-run restarts the worker group (max_failures=1), resumes from
   the last reported checkpoint and ends in the same state as an uninterrupted run: every step after the resume
   point reproduces the uninterrupted loss exactly, i.e. no step was applied twice.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from launchers_helpers import REPO, TINY, assert_curves_match, final_curve, launch_env, run_tool, train_losses

from hs_scale.launch.procs import pids_with_marker, wait_for

pytestmark = pytest.mark.slow


def submit(head, storage: Path, name: str, *extra: str, wait: bool = True, sub_id: str | None = None):
    """launchers/ray/submit.sh (blocking), or the same `ray job submit` detached with a submission id."""
    env = launch_env(RAY_ADDRESS=head.dashboard_url, NUM_WORKERS=2, STORAGE_PATH=storage, RUN_NAME=name,
                     MAX_FAILURES=1)
    cmd = ["bash", str(REPO / "launchers/ray/submit.sh"), str(TINY), *extra]
    if not wait:
        cmd = ["ray", "job", "submit", "--no-wait", "--submission-id", sub_id, "--", "python", "-m",
               "hs_scale.launch.ray_train", "--config", str(TINY), "--num-workers", "2", "--storage-path",
               str(storage), "--name", name, "--max-failures", "1", *extra]
    storage.mkdir(parents=True, exist_ok=True)
    return run_tool(cmd, timeout=240, env=env, log=storage.parent / f"{name}.log")


def registered_checkpoints(storage: Path, name: str) -> list[dict]:
    """Checkpoints the Ray controller has registered (only those are what get_checkpoint() resumes from)."""
    snap = storage / name / "checkpoint_manager_snapshot.json"
    try:
        return json.loads(snap.read_text()).get("checkpoint_results", [])
    except (OSError, ValueError):
        return []


def job_status(head, sub_id: str) -> str:
    rc, out = run_tool(["ray", "job", "status", sub_id], timeout=30,
                       env=launch_env(RAY_ADDRESS=head.dashboard_url))
    for state in ("SUCCEEDED", "FAILED", "STOPPED", "RUNNING", "PENDING"):
        if state in out or f"{state.lower()}" in out:  # "Job 'x' succeeded" / "status: SUCCEEDED"
            return state
    return f"unknown: {out[-500:]}"


def ray_checkpoints(storage: Path, name: str) -> list[Path]:
    return sorted((storage / name).glob("checkpoint_*"))


def test_ray_job_succeeds_and_checkpoints(readme_walk, torchrun_reference):
    step = readme_walk.step("launchers/ray/submit.sh")
    assert step.rc == 0 and "succeeded" in step.output.lower(), step.output[-5000:]
    storage = readme_walk.cwd.parent / "ray_results"  # README: STORAGE_PATH=/tmp/ray_results, redirected
    assert ray_checkpoints(storage, "hs_scale"), f"Ray persisted no checkpoint under {storage}/hs_scale"
    out = storage / "hs_scale" / "runs" / "ray_synthetic"  # relative train.output_dir goes under the storage path
    assert_curves_match(final_curve(out), torchrun_reference, what="Ray Train vs torchrun")


KILL_STEPS = 200


def test_ray_worker_killed_resumes_from_last_checkpoint(local_ray, tmp_path):
    # reference: the same 60-step job, uninterrupted, under torchrun (2 ranks)
    ref_dir = tmp_path / "ref"
    rc, log = run_tool(["bash", str(REPO / "launchers/torchrun.sh"), str(TINY), "--train.steps", str(KILL_STEPS),
                        "--train.output_dir", str(ref_dir)], timeout=180, env=launch_env(NPROC_PER_NODE=2))
    assert rc == 0, log[-3000:]
    reference = final_curve(ref_dir)

    storage, sub_id = tmp_path / "storage", f"hs-kill-{os.getpid()}-{int(time.time())}"
    rc, out = submit(local_ray, storage, "kill", "--train.steps", str(KILL_STEPS), "--train.save_every", "10",
                     wait=False, sub_id=sub_id)
    assert rc == 0, out
    run_dir = storage / "kill" / "runs" / "tiny_launch"
    try:
        wait_for(lambda: bool(registered_checkpoints(storage, "kill")), 180, "a registered checkpoint", 0.05)
    except TimeoutError:
        pytest.fail(f"no checkpoint registered; job {job_status(local_ray, sub_id)}")
    workers = [p for p in pids_with_marker(str(local_ray.root))
               if Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"ray::RayTrainWorker")]
    assert len(workers) == 2, f"expected 2 Ray Train workers, found {workers}"
    os.kill(workers[-1], signal.SIGKILL)
    killed_after = max(s for s, _ in train_losses(run_dir))
    wait_for(lambda: job_status(local_ray, sub_id) not in ("RUNNING", "PENDING"), 240, "the job to finish", 1)
    status = job_status(local_ray, sub_id)
    logs = run_tool(["ray", "job", "logs", sub_id], 30, launch_env(RAY_ADDRESS=local_ray.dashboard_url))[1]
    (tmp_path / "job.log").write_text(logs)
    assert status == "SUCCEEDED", logs[-6000:]
    assert killed_after < KILL_STEPS, "the worker was killed after training had finished: not mid-run"
    steps = [s for s, _ in train_losses(run_dir)]
    restarts = [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    assert len(restarts) == 1, f"expected exactly one restart in the logged steps {steps}"
    resumed_at = steps[restarts[0]]
    assert resumed_at > 1, f"the restarted workers began at step {resumed_at}: they did not resume from a checkpoint"
    assert "resuming from" in logs
    # The final state: each step once, from the checkpoint on recomputed exactly as in the uninterrupted run.
    assert_curves_match(final_curve(run_dir), reference, what="killed+resumed Ray run vs uninterrupted torchrun")
    assert registered_checkpoints(storage, "kill")[-1]["metrics"]["step"] == KILL_STEPS
