"""Process helpers shared by the local test clusters: free ports, bounded waits, and cleanup of *only* our processes.

A local cluster tags everything it starts with a unique marker (its temp directory) that appears in the command line
or the environment of every process it spawns, directly or through a daemon (slurmstepd, Ray workers). Cleanup
kills the processes it started by PID, then any remaining process carrying the marker - never by name.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports that were free a moment ago (kept bound together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_block(n: int, lo: int = 20000, hi: int = 32000) -> int:
    """First port of n consecutive free ports (for tools that take a port range), below the kernel's ephemeral
    range (32768+) so that `free_ports` (port 0 binds) never hands out one of them."""
    import random

    for _ in range(200):
        start = random.randrange(lo, hi - n)
        if all(_is_free(p) for p in range(start, start + n)):
            return start
    raise RuntimeError(f"no block of {n} free ports found")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def pids_with_marker(marker: str) -> list[int]:
    """PIDs (not ours) whose command line, environment, working dir or an open file contains `marker`.

    NOTE: open files matter: Ray's processes rename themselves (setproctitle), which clobbers the command line and
    environment, but they keep their log files (under the temp dir) open.
    """
    found, me = [], os.getpid()
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if needle in (entry / "cmdline").read_bytes() or needle in (entry / "environ").read_bytes():
                found.append(int(entry.name))
                continue
            links = [os.readlink(entry / "cwd")]
            for fd in (entry / "fd").iterdir():
                try:
                    links.append(os.readlink(fd))
                except OSError:  # closed meanwhile
                    pass
        except OSError:  # exited, or not readable (another user's process: not ours by definition)
            continue
        if any(marker in link for link in links):
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return False


def terminate(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL what is left."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def kill_marked(marker: str, grace: float = 5.0) -> list[int]:
    """Terminate every process carrying `marker` (a few rounds: daemons may respawn children); returns their PIDs."""
    killed: list[int] = []
    for _ in range(3):
        pids = pids_with_marker(marker)
        if not pids:
            break
        terminate(pids, grace)
        killed += pids
    return killed


def run(cmd: list[str], env: dict | None = None, timeout: float = 30, check: bool = True, **kw):
    """subprocess.run with a timeout and captured text output; raises with the output on failure."""
    res = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True, **kw)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}")
    return res
