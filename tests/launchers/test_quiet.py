"""hs_scale/launch/quiet.py in a fresh interpreter per rank: third-party warnings once on rank 0 (keyed by category
and first sentence, one line), none on other ranks, hs_scale's own warnings on every rank, silenced noise nowhere,
third-party INFO logging hidden, errors kept."""

from __future__ import annotations

import subprocess
import sys

import pytest
from launchers_helpers import launch_env

# Warnings as megatron raises them (its module name, the same first sentence from several places), one of ours, one
# listed in NOISE, and megatron / DeepSpeed log records.
SCRIPT = r'''
import logging, sys, types, warnings
from hs_scale.launch.quiet import quiet
quiet()
def warn_from(module, text, category=UserWarning):
    path = "/x/site-packages/" + module.replace(".", "/") + ".py"
    code = compile("import warnings\nwarnings.warn(TEXT, CATEGORY)", path, "exec")
    exec(code, {"__name__": module, "TEXT": text, "CATEGORY": category})
for i in range(3):
    warn_from("megatron.core.optimizer", f"Transformer Engine and Apex are not installed. Falling back to {i}.")
warn_from("megatron.core.transformer", "full scope is deprecated. Use empty cuda_graph_scope.")
warn_from("hs_scale.training", "our own warning")
log = logging.getLogger("megatron.core.distributed")
log.info("Params for bucket 1")
log.warning("megatron says something")
log.warning("megatron says something")
logging.getLogger("megatron.core").error("megatron failed")
'''


def run_rank(rank: int) -> str:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=launch_env(RANK=rank), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("rank", [0, 1])
def test_quiet_policy_per_rank(rank):
    out = run_rank(rank)
    apex = [line for line in out.splitlines() if "Transformer Engine and Apex" in line]
    assert apex == (["warning (megatron): UserWarning: Transformer Engine and Apex are not installed. Falling back "
                     "to 0."] if rank == 0 else []), out
    assert "full scope is deprecated" not in out and "Params for bucket" not in out
    assert "warnings.warn(" not in out
    assert out.count("our own warning") == 1, out
    assert out.count("megatron says something") == (1 if rank == 0 else 0), out
    assert out.count("megatron failed") == 1, out
