"""Slurm templates, run for real on a local two-node Slurm cluster (munged + slurmctld + slurmd n1/n2 on 127.0.0.1,
started and stopped by the `local_slurm` fixture): every template passes `sbatch --test-only`; the multi-node
torchrun template (sbatch --nodes=2) completes with a checkpoint and torchrun's loss curve; Ray-on-Slurm (head on
n1, worker on n2, then `ray job submit`) completes with a Ray checkpoint."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from launchers_helpers import (
    REF_CONFIG,
    REF_OVERRIDES,
    REPO,
    TINY,
    _ray_missing,
    assert_curves_match,
    checkpoints,
    final_curve,
    launch_env,
)

from hs_scale.launch.procs import free_port_block, free_ports, kill_marked

TEMPLATES = sorted((REPO / "launchers" / "slurm").glob("*.sbatch"))


def job_env(cluster, **extra) -> dict[str, str]:
    return {**launch_env(**extra), "SLURM_CONF": str(cluster.conf)}


def test_templates_exist():
    assert {t.name for t in TEMPLATES} == {"torchrun.sbatch", "ray.sbatch", "deepspeed.sbatch"}


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_template_passes_sbatch_test_only(local_slurm, template, tmp_path):
    res = local_slurm.client(["sbatch", "--test-only", "--nodes=2", f"--output={tmp_path}/x.out", str(template)],
                             env=job_env(local_slurm, CONFIG=TINY), cwd=REPO, check=False, timeout=20)
    assert res.returncode == 0 and "to start at" in res.stderr, res.stderr + res.stdout


def _sbatch_and_wait(cluster, template: str, out: Path, timeout: float, **params) -> tuple[dict, str]:
    log = out / "slurm-%j.out"
    job = cluster.sbatch(["--nodes=2", f"--output={log}", str(REPO / "launchers/slurm" / template)],
                         env=job_env(cluster, **params), cwd=str(REPO))
    info = cluster.wait_job(job, timeout=timeout)
    text = Path(str(log).replace("%j", job)).read_text() if Path(str(log).replace("%j", job)).exists() else ""
    return info, text


@pytest.mark.slow
def test_slurm_multinode_torchrun(local_slurm, tmp_path, torchrun_reference):
    (port,) = free_ports(1)
    ckpt = tmp_path / "run"
    info, log = _sbatch_and_wait(local_slurm, "torchrun.sbatch", tmp_path, 240, CONFIG=REF_CONFIG, CKPT_DIR=ckpt,
                                 GPUS_PER_NODE=1, JOB_PORT=port, EXTRA_ARGS=" ".join(REF_OVERRIDES))
    assert (info.get("JobState"), info.get("ExitCode")) == ("COMPLETED", "0:0"), log[-5000:]
    assert "nodes=2" in log
    assert checkpoints(ckpt), f"no checkpoint under {ckpt}"
    assert_curves_match(final_curve(ckpt), torchrun_reference, what="Slurm 2-node torchrun vs torchrun")


@pytest.mark.slow
def test_slurm_ray_on_slurm(local_slurm, tmp_path):
    reason = _ray_missing()
    if reason:
        pytest.skip(reason)
    ray_tmp = Path(tempfile.mkdtemp(prefix="hsrs", dir="/tmp"))
    ports = free_ports(12)
    worker_block = free_port_block(128)
    head_args = (f"--ray-client-server-port={ports[0]} --node-manager-port={ports[1]} "
                 f"--object-manager-port={ports[2]} --dashboard-agent-listen-port={ports[3]} "
                 f"--dashboard-agent-grpc-port={ports[4]} --metrics-export-port={ports[5]} "
                 f"--runtime-env-agent-port={ports[6]} --min-worker-port={worker_block} "
                 f"--max-worker-port={worker_block + 63}")
    worker_args = (f"--node-ip-address=127.0.0.1 --node-manager-port={ports[7]} --object-manager-port={ports[8]} "
                   f"--dashboard-agent-listen-port={ports[9]} --dashboard-agent-grpc-port={ports[10]} "
                   f"--metrics-export-port={ports[11]} --min-worker-port={worker_block + 64} "
                   f"--max-worker-port={worker_block + 127}")
    gcs, dash = free_ports(2)
    ckpt = tmp_path / "storage"
    try:
        info, log = _sbatch_and_wait(local_slurm, "ray.sbatch", tmp_path, 300, CONFIG=TINY, CKPT_DIR=ckpt,
                                     GPUS_PER_NODE=0, JOB_PORT=gcs, DASHBOARD_PORT=dash, RAY_TMP=ray_tmp,
                                     RAY_HEAD_ARGS=head_args, RAY_WORKER_ARGS=worker_args, HEAD_ADDR="127.0.0.1")
    finally:
        kill_marked(str(ray_tmp), grace=5)
    assert (info.get("JobState"), info.get("ExitCode")) == ("COMPLETED", "0:0"), log[-6000:]
    assert "2 nodes up" in log and "SUCCEEDED" in log.upper() or "succeeded" in log, log[-4000:]
    assert sorted((ckpt / "hs-ray").glob("checkpoint_*")), f"no Ray checkpoint under {ckpt}/hs-ray"
