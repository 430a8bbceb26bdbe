"""Atomic writes and damaged checkpoints: a crash mid-save never moves `latest`; a corrupt or half-written
checkpoint falls back to the previous one with a warning, or stops with an error naming it; loading never
runs pickled code."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from ckpt_models import optimizer_for, small_s2t  # noqa: E402

from hs_scale.checkpoint import (  # noqa: E402
    CheckpointCorruptError,
    CheckpointManager,
    CheckpointSaveError,
    load_full_model_state,
    safe_io,  # noqa: E402
)


@pytest.fixture(scope="module")
def trained():
    model = small_s2t(seed=0, dropout=0.0)
    optimizer, scheduler = optimizer_for(model)
    return model, optimizer, scheduler


def _two_checkpoints(root, trained):
    model, optimizer, scheduler = trained
    ckpt = CheckpointManager(root, keep_last=3)
    ckpt.save(1, model, optimizer, scheduler)
    ckpt.save(2, model, optimizer, scheduler)
    return ckpt


def _load(root, policy="fallback"):
    model = small_s2t(seed=1, dropout=0.0)
    optimizer, scheduler = optimizer_for(model)
    return CheckpointManager(root, on_corrupt=policy).load_latest(model, optimizer, scheduler)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped byte": lambda p: _flip_byte(p / "__0_0.distcp"),
    "truncated file": lambda p: os.truncate(p / "__0_0.distcp", 100),
    "missing marker": lambda p: (p / "COMPLETE").unlink(),
    "missing rank file": lambda p: (p / "rank_00000.json").unlink(),
    "garbage metadata": lambda p: (p / ".metadata").write_bytes(b"not a pickle"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_corrupt_latest_falls_back_with_warning(tmp_path, trained, damage):
    _two_checkpoints(tmp_path, trained)
    DAMAGE[damage](tmp_path / "step_000000002")
    with pytest.warns(UserWarning, match=r"step_000000002 is incomplete or corrupt .*falling back to .*step_000000001"):
        step, _ = _load(tmp_path)
    assert step == 1


def test_corrupt_latest_raises_when_asked(tmp_path, trained):
    _two_checkpoints(tmp_path, trained)
    _flip_byte(tmp_path / "step_000000002" / "__0_0.distcp")
    with pytest.raises(
        CheckpointCorruptError, match=r"step_000000002 is incomplete or corrupt: .*checksum.*step_000000001"
    ):
        _load(tmp_path, policy="raise")


def test_bad_pointer_and_nothing_usable(tmp_path, trained):
    _two_checkpoints(tmp_path, trained)
    (tmp_path / "latest").write_text("step_000000099\n")
    with pytest.warns(UserWarning, match="not a checkpoint folder"):
        assert _load(tmp_path)[0] == 2
    for step in (1, 2):
        (tmp_path / f"step_{step:09d}" / "COMPLETE").unlink()
    with pytest.warns(UserWarning), pytest.raises(CheckpointCorruptError, match="no usable checkpoint"):
        _load(tmp_path)
    assert _load(tmp_path / "empty") is None  # a fresh run


def test_exception_mid_save_keeps_previous_latest(tmp_path, trained, monkeypatch):
    model, optimizer, scheduler = trained
    ckpt = CheckpointManager(tmp_path, keep_last=3)
    ckpt.save(1, model, optimizer, scheduler)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safe_io, "save_tree", boom)
    with pytest.raises(CheckpointSaveError, match=r"step 2 failed: OSError: disk full; writing .*step_000000002\.tmp-"
                       r".*last intact checkpoint is .*step_000000001"):
        ckpt.save(2, model, optimizer, scheduler)
    monkeypatch.undo()
    assert (tmp_path / "latest").read_text().strip() == "step_000000001"
    assert not list(tmp_path.glob("step_000000002.tmp-*"))  # the failed save removed its half-written folder
    assert _load(tmp_path)[0] == 1
    ckpt.save(2, model, optimizer, scheduler)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000000001", "step_000000002"]


_KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path[:0] = [{tests!r}, os.path.dirname({tests!r})]  # ckpt_models, and the shared tests/_configs.py
    from ckpt_models import optimizer_for, small_s2t
    from hs_scale.checkpoint import CheckpointManager, manager, safe_io
    model = small_s2t(seed=0, dropout=0.0)
    optimizer, scheduler = optimizer_for(model)
    ckpt = CheckpointManager({root!r})
    ckpt.save(1, model, optimizer, scheduler)
    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if {where!r} == "data":      # while the tensors are being written
        manager.dcp.save = die
    elif {where!r} == "marker":  # every file written, before COMPLETE and the rename
        safe_io.write_json = die
    else:                        # renamed to step_2/, before `latest` moves
        safe_io.replace_text = die
    ckpt.save(2, model, optimizer, scheduler)
""")


@pytest.mark.parametrize("where", ["data", "marker", "pointer"])
def test_sigkill_mid_save_keeps_previous_latest(tmp_path, where):
    script = _KILLER.format(tests=str(Path(__file__).parent), root=str(tmp_path), where=where)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert (tmp_path / "latest").read_text().strip() == "step_000000001"
    assert _load(tmp_path, policy="raise")[0] == 1  # nothing is reported corrupt: step 2 never became `latest`


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_loading_never_runs_pickled_code(tmp_path, trained, monkeypatch):
    ckpt = _two_checkpoints(tmp_path, trained)
    # 1. An intact checkpoint loads with pickle.load/loads forbidden and torch.load only with weights_only=True.
    real_load = torch.load

    def checked_load(*args, **kwargs):
        assert kwargs.get("weights_only") is True, "torch.load without weights_only=True"
        return real_load(*args, **kwargs)

    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle.load(s) called while loading a checkpoint")

    monkeypatch.setattr(torch, "load", checked_load)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    assert _load(tmp_path, policy="raise")[0] == 2
    load_full_model_state(tmp_path)
    monkeypatch.undo()
    # 2. A tampered .metadata with a valid checksum is refused before anything runs.
    path = tmp_path / "step_000000002"
    (path / ".metadata").write_bytes(pickle.dumps(_Evil()))
    marker = json.loads((path / "COMPLETE").read_text())
    marker["files"][".metadata"] = {
        "size": (path / ".metadata").stat().st_size,
        "sha256": safe_io.sha256_file(path / ".metadata"),
    }
    (path / "COMPLETE").write_text(json.dumps(marker))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointCorruptError, match="posix.system.*not allowed|system, which is not allowed"):
        _load(tmp_path, policy="raise")
    assert not (tmp_path / "PWNED").exists()
    assert ckpt.verify(path) is not None
