"""A local Ray head for tests and laptops: own temp dir, free non-default ports, dashboard on 127.0.0.1.

    with LocalRay(Path("/tmp/ray-test"), num_cpus=2) as head:
        run(["ray", "job", "submit", "--address", head.dashboard_url, "--", "python", "-c", "print(1)"])

Cleanup never uses `ray stop` (it stops every Ray cluster of the machine): it kills the `ray start --block`
process it started, then every process whose command line or environment carries this head's temp dir.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

from hs_scale.launch.procs import free_port_block, free_ports, kill_marked, terminate, wait_for


class LocalRay:
    def __init__(self, root: Path, num_cpus: int = 2, host: str = "127.0.0.1"):
        # Ray's unix sockets live under the temp dir: keep its path short (AF_UNIX paths are limited to 107 bytes).
        self.root = Path(root).resolve()
        self.num_cpus, self.host = num_cpus, host
        self.proc: subprocess.Popen | None = None
        (self.gcs_port, self.dashboard_port, self.client_port, self.node_manager_port, self.object_manager_port,
         self.agent_http_port, self.agent_grpc_port, self.metrics_port, self.runtime_env_agent_port) = free_ports(9)
        self.worker_ports = free_port_block(64)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.host}:{self.dashboard_port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for `ray job submit` and friends aimed at this head."""
        return {**os.environ, "RAY_ADDRESS": self.dashboard_url, "HS_LOCAL_RAY": str(self.root)}

    def private_flags(self) -> list[str]:
        """`ray start` options that keep this head apart from any other on the machine: its own temp dir (which
        every process of it carries, for cleanup) and free ports instead of the defaults (6379, 8265, ...)."""
        return [
            "--disable-usage-stats", "--num-gpus=0", f"--temp-dir={self.root}",
            f"--node-ip-address={self.host}", f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={self.client_port}", f"--node-manager-port={self.node_manager_port}",
            f"--object-manager-port={self.object_manager_port}",
            f"--dashboard-agent-listen-port={self.agent_http_port}",
            f"--dashboard-agent-grpc-port={self.agent_grpc_port}", f"--metrics-export-port={self.metrics_port}",
            f"--runtime-env-agent-port={self.runtime_env_agent_port}",
            f"--min-worker-port={self.worker_ports}", f"--max-worker-port={self.worker_ports + 63}",
        ]

    def dashboard_up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def start(self, timeout: float = 90) -> LocalRay:
        self.root.mkdir(parents=True, exist_ok=True)
        ray = shutil.which("ray")
        if ray is None:
            raise RuntimeError("the `ray` command is missing: pip install 'ray[default,train]>=2.60,<2.61'")
        cmd = [ray, "start", "--head", "--block", f"--num-cpus={self.num_cpus}", f"--dashboard-host={self.host}",
               *self.private_flags()]
        env = {**os.environ, "HS_LOCAL_RAY": str(self.root), "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        log = open(self.root / "ray-start.log", "ab")  # noqa: SIM115 - lives as long as the head
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        try:
            wait_for(self._ready, timeout, f"the Ray head (log: {self.root}/ray-start.log)", 0.5)
        except Exception:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"`ray start` exited {self.proc.returncode}; see {self.root}/ray-start.log")
        return self.dashboard_up()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            terminate([self.proc.pid], grace=10)
        kill_marked(str(self.root), grace=5)
        self.proc = None

    def __enter__(self) -> LocalRay:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
