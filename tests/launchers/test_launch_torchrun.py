"""launchers/torchrun.sh, run for real: single node (2 CPU ranks, --standalone: the README's torchrun laptop line,
run by the README walk, tests/launchers/test_readme.py) and two "nodes" on loopback with a c10d rendezvous (two
torchrun agents, one rank each) - both must give the same loss curve and checkpoints."""

from __future__ import annotations

import os
import subprocess

import pytest
from launchers_helpers import (
    REF_CONFIG,
    REF_OVERRIDES,
    REF_STEPS,
    REPO,
    assert_curves_match,
    checkpoints,
    final_curve,
    launch_env,
)

from hs_scale.launch.procs import free_ports

pytestmark = pytest.mark.slow


def test_torchrun_single_node_two_ranks(torchrun_reference):
    # the README walk ran launchers/torchrun.sh with NPROC_PER_NODE=2; here: its curve is a real training curve
    losses = [torchrun_reference[s] for s in sorted(torchrun_reference)]
    assert len(losses) == REF_STEPS and all(loss == loss and loss > 0 for loss in losses)
    assert losses[-1] < losses[0], f"the synthetic task should learn something in {REF_STEPS} steps"


def test_torchrun_multinode_c10d_rendezvous(tmp_path, torchrun_reference):
    (port,) = free_ports(1)
    out = tmp_path / "run"
    procs = []
    for _ in range(2):  # one agent per "node", same command on each, as on a real cluster
        env = launch_env(NNODES=2, NPROC_PER_NODE=1, RDZV_ENDPOINT=f"127.0.0.1:{port}", RDZV_ID="launch-test")
        procs.append(subprocess.Popen(["bash", str(REPO / "launchers/torchrun.sh"), str(REF_CONFIG), *REF_OVERRIDES,
                                       "--train.output_dir", str(out)],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=180)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert checkpoints(out), f"no checkpoint under {out}"
    assert_curves_match(final_curve(out), torchrun_reference, what="torchrun 2 nodes x 1 vs 1 node x 2")
