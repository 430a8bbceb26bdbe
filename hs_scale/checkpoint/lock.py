"""One run per output directory: a lock file `<output_dir>/hs_scale.lock`, held by global rank 0.

    lock = OutputDirLock(out, force=cfg.train.force_unlock)
    lock.acquire()        # OutputDirLockedError naming the holder (host, pid, start time) and the fix
    ...
    lock.release()        # also at interpreter exit

Taking the lock is one `open(O_CREAT | O_EXCL)` (atomic on local file systems and NFSv3+), which writes who holds
it: host name, boot id, pid, the process's start time (from /proc, so a reused pid is not mistaken for the
holder) and the launcher's incarnation id (SLURM_JOB_ID, torchrun's run id or HS_SCALE_RUN_ID).

A lock left by a dead process (SIGKILL, a node crash) is taken over only when that is provably safe:
* same host and boot: the holder's pid is gone, or now belongs to another process (start time differs);
* same incarnation id (a Slurm requeue or a torchrun/Ray restart of this very job, which the scheduler never
  runs twice at once), from any host.
A lock held from another host by another job cannot be checked from here (its pid means nothing on this
machine): it is refused until the user says the run is gone, with `train.force_unlock=true` (or by deleting
the file). Taking over renames the stale file aside first, so of two runs racing for a stale lock one wins.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import socket
import time
from pathlib import Path

LOCK_NAME = "hs_scale.lock"


class OutputDirLockedError(RuntimeError):
    """Another run holds the output directory's lock."""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat); "" if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # fields after "(comm)": state is field 3, starttime field 22


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def incarnation_id() -> str:
    """An id shared by every restart of one job (Slurm requeue, torchrun restart, Ray restart); "" if none."""
    for var in ("HS_SCALE_RUN_ID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):  # Ray sets HS_SCALE_RUN_ID
        value = os.environ.get(var, "")
        if value and value != "none":
            return f"{var}={value}"
    return ""


class OutputDirLock:
    def __init__(self, directory: str | os.PathLike, force: bool = False):
        self.path = Path(directory) / LOCK_NAME
        self.force = force
        self.record = {
            "host": socket.gethostname(),
            "boot_id": _boot_id(),
            "pid": os.getpid(),
            "start_time": _start_time(os.getpid()),
            "incarnation": incarnation_id(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "nonce": secrets.token_hex(8),
        }
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read(self.path)
                why_stale = self._stale(holder)
                if why_stale is None:
                    raise OutputDirLockedError(self._refusal(holder)) from None
                self._take_over(holder, why_stale)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.record))
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            atexit.register(self.release)
            return
        raise OutputDirLockedError(f"{self.path}: another run keeps taking this lock; is one starting right now?")

    def release(self) -> None:
        """Remove the lock if it is still ours (never another run's)."""
        if self.held and self._read(self.path).get("nonce") == self.record["nonce"]:
            self.path.unlink(missing_ok=True)
        self.held = False

    # --------------------------------------------------------------------------------------------------------
    @staticmethod
    def _read(path: Path) -> dict:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def _stale(self, holder: dict) -> str | None:
        """Why the holder is provably gone, or None if it may still run."""
        if self.force:
            return "train.force_unlock=true"
        if holder.get("incarnation") and holder["incarnation"] == self.record["incarnation"]:
            return f"an earlier incarnation of this job ({holder['incarnation']})"
        same_machine = holder.get("host") == self.record["host"] and holder.get("boot_id") == self.record["boot_id"]
        if not same_machine or not isinstance(holder.get("pid"), int):
            return None
        if not _pid_alive(holder["pid"]):
            return f"its process {holder['pid']} is gone"
        if holder.get("start_time") and _start_time(holder["pid"]) != holder["start_time"]:
            return f"pid {holder['pid']} now belongs to another process"
        return None

    def _take_over(self, holder: dict, why: str) -> None:
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{secrets.token_hex(4)}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # someone else removed it: retry
        if self._read(aside) != holder:  # we moved a lock taken meanwhile by another run: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        print(f"hs-scale: took over the stale lock {self.path} (held by pid {holder.get('pid')} on "
              f"{holder.get('host')}: {why})", flush=True)

    def _refusal(self, holder: dict) -> str:
        if not holder:
            who = "an unknown process (the lock file is empty or unreadable)"
        else:
            who = f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')}"
        same_host = holder.get("host") == self.record["host"] and holder.get("boot_id") == self.record["boot_id"]
        hint = ("stop that run first, or use another train.output_dir" if same_host and holder else
                "if that run is gone (it cannot be checked from this host), rerun with --train.force_unlock true "
                f"or delete {self.path}; otherwise use another train.output_dir")
        return f"output directory {self.path.parent} is in use by another run ({who}): {hint}"
