"""Run README.md's "Quick start" and "Launching" commands in README order, as a new user would (test_readme.py).

What is run: every command of the ```bash blocks under "## Quick start" and "## Launching", in order, each with
`bash -c` and the README text as it stands (continuation lines joined, trailing comments dropped), with cwd a fresh
temp dir holding symlinks to the repo's configs/ and launchers/ (so repo-relative inputs resolve and every output
- data/, runs/, export/ - lands in the temp dir). The one environment is launch_env() (the repo importable, one
thread per rank, no GPU) plus a free MASTER_PORT (DeepSpeed's default 29500 may be taken on a shared machine).

What is skipped, by rule (each is listed in the result with its reason):
- commands naming `configs/x.yaml`: the README's placeholder for your own cluster config (GPU cluster, multi-node,
  TP x PP on 4 ranks); likewise the multi-node DeepSpeed lines naming a `hostfile` (ssh to other machines);
- the "### Slurm" subsection: it needs root and its own cluster (tests/launchers/test_launch_slurm.py runs those
  templates on a local two-node Slurm cluster).

What is changed, and why (nothing else):
- budget: every training command (`hs-scale train`, `launchers/*.sh`) gets BUDGET appended (8 steps, a checkpoint
  every 4, one evaluation, a loss every step, 2 warm-up steps, one thread per process: on CI's 2 shared cores two
  threads of one process wait on each other, 20x slower); later `--section.field` values override earlier ones. The
  demo line would otherwise train ~8 min, the synthetic ones ~40 s.
- the demo corpus: `prepare-data --recipe demo` gets `--size 12 --dev-size 3 --test-size 3 --vocab-size 64`
  appended (argparse: the last value wins), 18 utterances instead of 5,550; a corpus that small has fewer than the
  demo's 256 subwords, so the demo training line also gets `--model.vocab_size=64`.
- Ray: `ray start` gets LocalRay.private_flags() appended (its own temp dir and free ports instead of 6379/8265:
  other Ray clusters may run on this machine), `http://127.0.0.1:8265` becomes that head's dashboard URL, and
  `ray stop` - which stops every Ray cluster of the machine - is replaced by stopping that head (LocalRay.stop: the
  processes carrying its temp dir). `/tmp/ray_results` becomes `<temp dir>/ray_results`.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from launchers_helpers import BUDGET, REPO, launch_env, run_tool

from hs_scale.launch.local_ray import LocalRay
from hs_scale.launch.procs import free_ports, wait_for

SECTIONS = ("## Quick start", "## Launching")
SKIP_SUBSECTIONS = {"### Slurm": "needs root and its own cluster: test_launch_slurm.py runs these templates"}
DEMO_DATA = ["--size", "12", "--dev-size", "3", "--test-size", "3", "--vocab-size", "64"]
DEMO_VOCAB = ["--model.vocab_size=64"]
README_DASHBOARD = "http://127.0.0.1:8265"
README_STORAGE = "/tmp/ray_results"


@dataclass
class Step:
    section: str
    readme: str  # the command as README.md has it
    run: str | None = None  # what ran (None: skipped or not reached)
    skipped: str | None = None
    rc: int | None = None
    output: str = ""
    seconds: float = 0.0


@dataclass
class Walk:
    cwd: Path
    steps: list[Step] = field(default_factory=list)

    def step(self, needle: str) -> Step:
        """The one step that ran whose README text contains `needle`."""
        found = [s for s in self.steps if needle in s.readme and s.skipped is None]
        assert len(found) == 1, f"{len(found)} README steps contain {needle!r}: {[s.readme for s in found]}"
        return found[0]


def readme_commands(text: str) -> list[tuple[str, str]]:
    """(subsection, command) for each command of the bash blocks of SECTIONS, in README order."""
    commands, section, top, in_block, pending = [], "", "", False, ""
    for line in text.splitlines():
        if not in_block and line.startswith("#"):
            if line.startswith("## "):
                top = line.strip()
            section = line.strip()
            continue
        if line.startswith("```"):
            in_block = line.strip() == "```bash" and top in SECTIONS
            continue
        if not in_block:
            continue
        code = re.sub(r"(^|\s)#.*$", "", line).rstrip()  # comments: whole-line or trailing
        if code.endswith("\\"):
            pending += code[:-1].strip() + " "
            continue
        command = (pending + code.strip()).strip()
        pending = ""
        if command:
            commands.append((section, command))
    return commands


def _skip_reason(section: str, command: str) -> str | None:
    if section in SKIP_SUBSECTIONS:
        return SKIP_SUBSECTIONS[section]
    if "configs/x.yaml" in command:
        return "configs/x.yaml is the README's placeholder for your own (cluster) config"
    if "hostfile" in command:
        return "multi-node over ssh (hostfile)"
    return None


def _adapted(command: str, head: LocalRay | None, tmp: Path) -> str:
    """The README command with the budget and the isolation changes of the module docstring."""
    if command.startswith("ray start"):
        return " ".join([command, *head.private_flags()])
    command = command.replace(README_DASHBOARD, head.dashboard_url if head else README_DASHBOARD)
    command = command.replace(README_STORAGE, str(tmp / "ray_results"))
    extra = []
    if re.search(r"\bhs-scale train\b|launchers/\S+\.sh\b", command):
        extra += BUDGET
        if "configs/demo_asr.yaml" in command:
            extra += DEMO_VOCAB
    if "prepare-data --recipe demo" in command:
        extra += DEMO_DATA
    return " ".join([command, *extra])


def walk(tmp: Path, timeout: float = 420) -> Walk:
    """Run the README in order; stop at the first failing step (later steps build on earlier ones)."""
    cwd = tmp / "checkout"
    cwd.mkdir()
    for name in ("configs", "launchers"):
        (cwd / name).symlink_to(REPO / name)
    (port,) = free_ports(1)
    env = launch_env(MASTER_PORT=port)
    result, head, failed = Walk(cwd), None, False
    try:
        for section, command in readme_commands((REPO / "README.md").read_text()):
            step = Step(section, command, skipped=_skip_reason(section, command))
            result.steps.append(step)
            if step.skipped or failed:
                continue
            if command.startswith("ray start"):
                head = LocalRay(Path(f"/tmp/hsrw{port}"))  # short: Ray's unix sockets live under it
                env = {**env, "HS_LOCAL_RAY": str(head.root), "RAY_USAGE_STATS_ENABLED": "0"}
            start = time.monotonic()
            if command == "ray stop":
                step.run = "LocalRay.stop()  # instead of `ray stop`, which stops every Ray cluster of this machine"
                head.stop()
                head, step.rc = None, 0
            else:
                step.run = _adapted(command, head, tmp)
                step.rc, step.output = run_tool(["bash", "-c", step.run], timeout=timeout, env=env, cwd=cwd)
                if command.startswith("ray start") and step.rc == 0:
                    wait_for(head.dashboard_up, 60, "the Ray dashboard", 0.5)
            step.seconds = time.monotonic() - start
            failed = step.rc != 0
    finally:
        if head is not None:
            head.stop()
        shutil.rmtree(f"/tmp/hsrw{port}", ignore_errors=True)
    (tmp / "walk.log").write_text("\n\n".join(
        f"### {s.readme}\n# ran: {s.run}\n# skipped: {s.skipped}\n# rc={s.rc} {s.seconds:.1f}s\n{s.output}"
        for s in result.steps))
    return result
