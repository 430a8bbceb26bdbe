"""A real Slurm cluster on one machine (munged + slurmctld + one slurmd per "node"), for tests and laptops.

    with LocalSlurm(Path("/tmp/slurm"), nodes=2) as cluster:
        job = cluster.sbatch(["launchers/slurm/torchrun.sbatch"], env={"HS_CONFIG": "configs/synthetic.yaml"})
        state = cluster.wait_job(job, timeout=120)

    python -m hs_scale.launch.local_slurm start --dir /tmp/hs-slurm     # prints `export SLURM_CONF=...`
    python -m hs_scale.launch.local_slurm stop --dir /tmp/hs-slurm

Needs Debian's slurmctld, slurmd, slurm-client and munge (`launchers/install_test_deps.sh`) and root (slurmd
launches job steps as their user). Recipe and traps: docs/launching.md and the shared stack notes. Every daemon binds
to 127.0.0.1 on free, non-default ports; everything lives under `root`. `stop()` cancels our jobs, shuts our
controller down, and kills only processes that carry our SLURM_CONF path (in their command line or environment).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from hs_scale.launch.procs import free_ports, kill_marked, run, terminate, wait_for

REQUIRED_BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "srun")


def missing_binaries() -> list[str]:
    return [b for b in REQUIRED_BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _bin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


SLURM_CONF = """\
ClusterName=hstest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.txt
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=300
{node_lines}
PartitionName=debug Nodes={node_names} Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    def __init__(self, root: Path, nodes: int = 2, cpus_per_node: int | None = None, memory_mb: int = 2000):
        self.root = Path(root).resolve()
        self.node_names = [f"n{i + 1}" for i in range(nodes)]
        self.cpus = cpus_per_node or os.cpu_count() or 1
        self.memory_mb = memory_mb
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge-sock" / "munge.socket"
        self._procs: list[subprocess.Popen] = []
        self.jobs: list[str] = []

    # ---------------------------------------------------------------- environment for clients and jobs
    @property
    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF: pass this to sbatch/srun/squeue (jobs inherit it: --export=ALL)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # ---------------------------------------------------------------- start / stop
    def start(self, timeout: float = 30) -> LocalSlurm:
        missing = missing_binaries()
        if missing:
            raise RuntimeError(f"Slurm/munge binaries missing: {missing}; run launchers/install_test_deps.sh")
        self.root.mkdir(parents=True, exist_ok=True)
        keydir, sockdir = self.root / "munge-key", self.munge_socket.parent
        keydir.mkdir(mode=0o700, exist_ok=True)
        sockdir.mkdir(exist_ok=True)
        os.chmod(keydir, 0o700)
        os.chmod(sockdir, 0o755)  # munged refuses a socket folder others cannot traverse ("Socket is inaccessible")
        os.chmod(self.root, 0o755)
        key = keydir / "munge.key"
        if not key.exists():
            run([_bin("mungekey"), "--create", f"--keyfile={key}"])
        self._spawn(
            [_bin("munged"), "-F", f"--socket={self.munge_socket}", f"--key-file={key}",
             f"--pid-file={self.root}/munged.pid", f"--seed-file={keydir}/munged.seed",
             f"--log-file={self.root}/munged.log"],
            "munged",
        )
        wait_for(self.munge_socket.exists, 10, "the munge socket")
        ctld_port, *node_ports = free_ports(1 + len(self.node_names))
        node_lines = "\n".join(
            f"NodeName={n} NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus} "
            f"RealMemory={self.memory_mb} State=UNKNOWN"
            for n, p in zip(self.node_names, node_ports, strict=True)
        )
        self.conf.write_text(SLURM_CONF.format(
            ctld_port=ctld_port, munge_socket=self.munge_socket, root=self.root,
            node_lines=node_lines, node_names=",".join(self.node_names),
        ))
        (self.root / "state").mkdir(exist_ok=True)
        self._spawn([_bin("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld")
        for name in self.node_names:
            self._spawn([_bin("slurmd"), "-D", "-N", name, "-f", str(self.conf)], f"slurmd-{name}")
        try:
            wait_for(self._all_idle, timeout, f"{len(self.node_names)} idle Slurm nodes (logs in {self.root})", 0.5)
        except TimeoutError:
            self.stop()
            raise
        return self

    def _spawn(self, cmd: list[str], name: str) -> None:
        log = open(self.root / f"{name}.out", "ab")  # noqa: SIM115 - closed with the process
        self._procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True))

    def _all_idle(self) -> bool:
        if any(p.poll() is not None for p in self._procs):
            dead = [p.args[0] for p in self._procs if p.poll() is not None]
            raise RuntimeError(f"Slurm daemon exited early: {dead}; see logs in {self.root}")
        res = self.client(["sinfo", "-h", "-N", "-o", "%N %t"], check=False, timeout=5)
        states = dict(line.split() for line in res.stdout.splitlines() if line.strip())
        return res.returncode == 0 and all(states.get(n, "").startswith("idle") for n in self.node_names)

    def stop(self) -> None:
        """Cancel our jobs, shut our daemons down, then kill anything still carrying our SLURM_CONF."""
        if self.munge_socket.exists() and self._procs and self._procs[0].poll() is None:
            for job in self.jobs:
                self.client(["scancel", job], check=False, timeout=5)
            try:
                wait_for(lambda: not self.client(["squeue", "-h"], check=False, timeout=5).stdout.strip(), 15,
                         "cancelled jobs to leave the queue")
            except (TimeoutError, subprocess.TimeoutExpired):
                pass
            self.client(["scontrol", "shutdown"], check=False, timeout=5)
        daemons = self._procs[1:]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(p.poll() is None for p in daemons):
            time.sleep(0.2)
        terminate([p.pid for p in daemons if p.poll() is None], grace=3)  # slurmd may ignore SIGTERM
        kill_marked(str(self.conf), grace=3)  # slurmstepd and job processes we caused
        terminate([p.pid for p in self._procs[:1] if p.poll() is None], grace=3)  # munged last
        for p in self._procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- clients
    def client(self, cmd: list[str], timeout: float = 30, check: bool = True, **kw):
        """Run a Slurm client command against this cluster (bounded: a dead munge makes clients hang)."""
        return run(cmd, env={**self.env, **kw.pop("env", {})}, timeout=timeout, check=check, **kw)

    def sbatch(self, args: list[str], env: dict | None = None, cwd: str | None = None) -> str:
        res = self.client(["sbatch", "--parsable", *args], env=env or {}, cwd=cwd)
        job = res.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def test_only(self, args: list[str], env: dict | None = None, cwd: str | None = None):
        """`sbatch --test-only`: validates the script and its #SBATCH options against the controller."""
        return self.client(["sbatch", "--test-only", *args], env=env or {}, cwd=cwd, check=False)

    def job_info(self, job: str) -> dict[str, str]:
        out = self.client(["scontrol", "show", "job", "-o", job], check=False, timeout=10).stdout
        info = {}
        for token in out.split():
            key, _, value = token.partition("=")
            info.setdefault(key, value)
        return info

    def wait_job(self, job: str, timeout: float) -> dict[str, str]:
        """Poll until the job left the queue (or timed out: then it is cancelled); returns `scontrol show job`."""
        def done() -> bool:
            return not self.client(["squeue", "-h", "-j", job], check=False, timeout=10).stdout.strip()

        try:
            wait_for(done, timeout, f"Slurm job {job}", 0.5)
        except TimeoutError:
            self.client(["scancel", job], check=False, timeout=5)
            raise
        return self.job_info(job)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hs_scale.launch.local_slurm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", required=True, help="state folder of the local cluster")
    parser.add_argument("--nodes", type=int, default=2)
    args = parser.parse_args(argv)
    cluster = LocalSlurm(Path(args.dir), nodes=args.nodes)
    pidfile = cluster.root / "pids.json"
    if args.action == "start":
        cluster.start()
        pidfile.write_text(json.dumps([p.pid for p in cluster._procs]))
        print(f"export SLURM_CONF={cluster.conf}")
        return 0
    pids = json.loads(pidfile.read_text()) if pidfile.exists() else []
    if cluster.munge_socket.exists():
        cluster.client(["scontrol", "shutdown"], check=False, timeout=5)
    time.sleep(2)
    terminate(pids[1:], grace=3)
    kill_marked(str(cluster.conf), grace=3)
    terminate(pids[:1], grace=3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
