"""Preemption and two runs on one directory.

SIGTERM to torchrun (forwarded to both ranks), SIGUSR1 to ONE rank only (the ranks must agree through their
all-reduce) and SIGINT to a single process all end in a checkpoint at the step where training stopped and exit
code 75; rerunning resumes it, and the loss curve equals an uninterrupted run's. A second run on a directory in
use is refused; a stale lock of a dead process is taken over; one from another host needs force_unlock.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import pytest
import torch
from rel_helpers import TINY, final_losses, one_error_line, records, run, start, stop_group, train_cmd, wait_for_step

from hs_scale.checkpoint import load_full_model_state
from hs_scale.checkpoint.lock import LOCK_NAME, OutputDirLock, OutputDirLockedError
from hs_scale.cli import main as cli_main

STEPS = 40
LONG = ["--train.steps", str(STEPS), "--train.save_every", "1000"]  # only the preemption save happens mid-run


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """The uninterrupted 2-rank curve."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = run(train_cmd(out, *LONG, nproc=2), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = final_losses(out)
    assert sorted(curve) == list(range(1, STEPS + 1))
    return curve


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (torchrun's ranks), from /proc."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _interrupt(out: Path, log: Path, at_step: int, send) -> int:
    """Start (or resume) the 2-rank run, signal it once `at_step` is logged; returns the step it stopped at."""
    proc = start(train_cmd(out, *LONG, nproc=2), log)
    try:
        wait_for_step(out, at_step, proc)
        send(proc)
        proc.wait(timeout=90)
    finally:
        stop_group(proc)
    text = log.read_text()
    assert "hs-scale train: stopped by" in text and "checkpoint saved at" in text, text[-3000:]
    stopped = records(out, "preempted")[-1]["step"]
    assert at_step <= stopped < STEPS, "the run ended before the signal: the test proves nothing"
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:09d}"  # saved where it stopped
    assert not (out / LOCK_NAME).exists()  # released on the way out
    return stopped


def _usr1_to_one_rank(proc) -> None:
    ranks = _children(proc.pid)
    assert len(ranks) == 2, ranks
    os.kill(max(ranks), signal.SIGUSR1)  # one rank only (the one started last): the other learns it by all-reduce


@pytest.mark.slow
def test_preempted_twice_under_torchrun_then_resumed_exactly(tmp_path, reference, capsys):
    """SIGUSR1 to one rank, then (after a resume) SIGTERM to torchrun; the final curve is the uninterrupted one."""
    out = tmp_path / "run"
    first = _interrupt(out, tmp_path / "log1.txt", 5, _usr1_to_one_rank)
    second = _interrupt(out, tmp_path / "log2.txt", first + 5, lambda proc: proc.send_signal(signal.SIGTERM))
    assert f"resumed from step {first}" in (tmp_path / "log2.txt").read_text()
    resumed = run(train_cmd(out, *LONG, nproc=2), timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {second}" in resumed.stdout
    assert final_losses(out) == reference  # exact: the same floats as the uninterrupted run, at every step
    assert [r["step"] for r in records(out, "resume")] == [first, second]

    # That data-parallel-2 checkpoint cannot be resumed by one process (its data cursor is per rank): the refusal
    # points at init_from, which starts a new one-process run from its weights (any layout reads any other).
    with pytest.warns(UserWarning, match="saved with data_parallel=2, this run has 1"):
        assert cli_main(["train", "--config", TINY, "--train.output_dir", str(out), "--train.steps", "42"]) == 2
    assert "--train.init_from" in one_error_line(capsys.readouterr().err)
    single = tmp_path / "single"
    assert cli_main(["train", "--config", TINY, "--train.output_dir", str(single), "--train.steps", "1",
                     "--train.init_from", str(out), "--train.lr", "1e-12"]) == 0
    _, theirs = load_full_model_state(out / "checkpoints")
    _, ours = load_full_model_state(single / "checkpoints")
    for name, tensor in theirs.items():
        if not name.endswith((".draws", ".temperature")):
            torch.testing.assert_close(ours[name], tensor, atol=1e-8, rtol=0, msg=name)


def test_sigint_single_process_saves_and_exits_75(tmp_path):
    out = tmp_path / "run"
    proc = start(train_cmd(out, "--train.steps", "400", "--train.save_every", "1000"), tmp_path / "log.txt")
    try:
        wait_for_step(out, 3, proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 75
    finally:
        stop_group(proc)
    log = (tmp_path / "log.txt").read_text()
    assert "Traceback" not in log, log[-3000:]
    stopped = records(out, "preempted")[-1]["step"]
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:09d}"


# ------------------------------------------------------------------------------------------------ locks
def test_second_run_on_the_same_output_dir_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    first = start(train_cmd(out, "--train.steps", "400"), tmp_path / "first.txt")
    try:
        wait_for_step(out, 1, first)
        assert cli_main(["train", "--config", TINY, "--train.output_dir", str(out), "--train.seed", "2"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"output directory {out} is in use by another run (pid {first.pid} on host" in line, line
        assert "seed: 1" in (out / "config.yaml").read_text()  # the refused run wrote nothing
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)
        stop_group(first)


def _write_lock(directory: Path, **record) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LOCK_NAME).write_text(json.dumps(record))


def test_stale_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, capsys):
    mine = OutputDirLock(tmp_path)
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)  # a pid that surely is not running
    _write_lock(tmp_path, host=mine.record["host"], boot_id=mine.record["boot_id"], pid=dead, start_time="1")
    mine.acquire()
    assert f"took over the stale lock {tmp_path / LOCK_NAME} (held by pid {dead}" in capsys.readouterr().out
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    mine.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_of_a_live_process_or_another_host_is_refused(tmp_path):
    me = OutputDirLock(tmp_path).record
    _write_lock(tmp_path, host=me["host"], boot_id=me["boot_id"], pid=os.getppid(), start_time=_start_of(os.getppid()))
    with pytest.raises(OutputDirLockedError, match="stop that run first"):
        OutputDirLock(tmp_path).acquire()
    _write_lock(tmp_path, host="node-17-" + socket.gethostname(), boot_id="x", pid=1, since="yesterday")
    with pytest.raises(OutputDirLockedError, match=r"pid 1 on host node-17-.*--train.force_unlock true"):
        OutputDirLock(tmp_path).acquire()
    forced = OutputDirLock(tmp_path, force=True)
    forced.acquire()
    forced.release()


def test_requeued_job_takes_over_its_own_lock_from_another_host(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    _write_lock(tmp_path, host="other-node", boot_id="x", pid=1, incarnation="SLURM_JOB_ID=4242")
    lock = OutputDirLock(tmp_path)
    lock.acquire()
    lock.release()


def _start_of(pid: int) -> str:
    from hs_scale.checkpoint.lock import _start_time

    return _start_time(pid)


def test_lock_is_released_when_the_run_fails(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(["train", "--config", TINY, "--train.output_dir", str(out), "--train.resume", "must"]) == 2
    assert "train.resume=must but there is no checkpoint" in one_error_line(capsys.readouterr().err)
    assert not (out / LOCK_NAME).exists()
