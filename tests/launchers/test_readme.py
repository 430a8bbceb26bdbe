"""The README, followed as a new user would: its quick start and launch sections run in order on one machine and no
step fails (tests/launchers/readme_walk.py says exactly what runs, what is skipped by which rule, and which lines are
shrunk). The torchrun, DeepSpeed and Ray runs of this walk are also the launcher tests' runs
(test_launch_torchrun.py, test_launch_deepspeed.py, test_launch_ray.py compare their loss curves).

Console output: a 2-rank torchrun run (and the DeepSpeed and Ray ones) shows no third-party warning line more than
once, and the end-of-run summary once (hs_scale/launch/quiet.py).
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from launchers_helpers import REPO, checkpoints
from readme_walk import readme_commands

ANSI = re.compile(r"\x1b\[[0-9;]*m")
RAY_PREFIX = re.compile(r"^\((\w+) pid=\d+(?:, ip=[\d.]+)?\)\s*")
TIMESTAMP = re.compile(r"^\[?\d{4}-\d\d-\d\d[ T][\d:,.]+\]?\s*")
WARNING_LINE = re.compile(r"warning|warnings\.warn\(", re.IGNORECASE)


def console_lines(output: str) -> list[str]:
    """Lines as a person reads them, without colours, Ray's `(Worker pid=N)` prefix and log timestamps."""
    lines = []
    for line in output.splitlines():
        line = TIMESTAMP.sub("", RAY_PREFIX.sub("", ANSI.sub("", line))).strip()
        if line:
            lines.append(line)
    return lines


def repeated_warnings(output: str) -> dict[str, int]:
    counts = Counter(line for line in console_lines(output) if WARNING_LINE.search(line))
    return {line: n for line, n in counts.items() if n > 1}


def test_readme_commands_are_found_in_order():
    commands = [c for _, c in readme_commands((REPO / "README.md").read_text())]
    wanted = ["hs-scale train --config configs/synthetic.yaml", "hs-scale prepare-data --recipe demo",
              "configs/demo_asr.yaml --data.manifest", "hs-scale evaluate", "hs-scale export-hf",
              "launchers/torchrun.sh configs/synthetic.yaml", "ray start", "launchers/ray/submit.sh configs/synthetic",
              "ray stop", "launchers/deepspeed/run.sh configs/synthetic.yaml", "hs_scale.launch.ds_config"]
    positions = [next((i for i, c in enumerate(commands) if w in c), None) for w in wanted]
    assert None not in positions, dict(zip(wanted, positions, strict=True))
    assert positions == sorted(positions), "README order changed"


@pytest.mark.slow
def test_readme_runs_in_order_without_a_failing_step(readme_walk):
    failed = [s for s in readme_walk.steps if s.rc not in (0, None)]
    assert not failed, f"README step failed: {failed[0].run}\n{failed[0].output[-5000:]}"
    ran = [s for s in readme_walk.steps if s.skipped is None]
    assert all(s.rc == 0 for s in ran), [s.readme for s in ran if s.rc is None]
    assert len(ran) >= 11, [s.readme for s in ran]
    skipped = [s for s in readme_walk.steps if s.skipped]
    assert all("configs/x.yaml" in s.readme or "hostfile" in s.readme or "Slurm" in s.section for s in skipped)


@pytest.mark.slow
def test_quick_start_outputs(readme_walk):
    cwd = readme_walk.cwd
    assert checkpoints(cwd / "runs/synthetic") and checkpoints(cwd / "runs/demo_subset")
    evaluation = readme_walk.step("hs-scale evaluate").output
    assert re.search(r"^average\s+\d", evaluation, re.MULTILINE), evaluation[-2000:]
    config = json.loads((cwd / "export/de/config.json").read_text())
    assert config["model_type"] == "speech_to_text"
    show = readme_walk.step("hs-scale show-config").output
    assert "strategy: group" in show and "arch: s2t" in show
    derived = json.loads(readme_walk.step("hs_scale.launch.ds_config").output)
    assert derived["zero_optimization"]["stage"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["launchers/torchrun.sh", "launchers/deepspeed/run.sh",
                                      "launchers/ray/submit.sh"])
def test_console_output_each_warning_once_summary_once(readme_walk, launcher):
    output = readme_walk.step(launcher).output
    assert not repeated_warnings(output), repeated_warnings(output)
    assert "warnings.warn(" not in output and "Params for bucket" not in output
    assert sum("Transformer Engine and Apex are not installed" in line for line in console_lines(output)) <= 1
    assert sum(line.startswith("outputs in ") for line in console_lines(output)) == 1, output[-3000:]
    if launcher != "launchers/ray/submit.sh":  # Ray's own driver logs the job's progress at INFO
        assert "[INFO]" not in output, "DeepSpeed's INFO banners"
    assert "Setting accelerator to CPU" not in output
