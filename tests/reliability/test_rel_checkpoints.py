"""Checkpoints under faults: a corrupt checkpoint is refused by EVERY read path (naming the folder and the reason),
retention never keeps a bad checkpoint in place of a good one, averaging takes only verified ones, and a save that
hits a full disk cleans up, says so in one line, and leaves a run that resumes with no manual step."""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from rel_helpers import TINY, flip_byte, one_error_line

from hs_scale.checkpoint import (
    CheckpointCorruptError,
    CheckpointManager,
    CheckpointSaveError,
    load_full_model_state,
)
from hs_scale.cli import main as cli_main

STEP4 = "step_000000004"


@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    """A tiny synthetic run with checkpoints at steps 2 and 4 (in-process: no interpreter start-up)."""
    out = tmp_path_factory.mktemp("good") / "run"
    assert cli_main(["train", "--config", TINY, "--train.output_dir", str(out), "--train.steps", "4",
                     "--train.save_every", "2"]) == 0
    return out


@pytest.fixture
def corrupt_run(good_run, tmp_path) -> Path:
    """A copy of good_run whose newest checkpoint (step 4, `latest`) has one flipped byte in its tensors."""
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    flip_byte(out / "checkpoints" / STEP4 / "__0_0.distcp")
    return out


def _corrupt_refusal(text: str) -> None:
    assert STEP4 in text and "fails its checksum" in text, text


def test_evaluate_refuses_a_corrupt_step_folder(corrupt_run, capsys):
    from hs_scale.evaluation.cli import main as evaluate

    assert evaluate(["--checkpoint", str(corrupt_run / "checkpoints" / STEP4), "--beam", "1"]) == 2
    _corrupt_refusal(capsys.readouterr().err)
    # The explicit override loads it anyway.
    assert evaluate(["--checkpoint", str(corrupt_run / "checkpoints" / STEP4), "--beam", "1", "--no-verify"]) == 0


def test_export_refuses_a_corrupt_step_folder(corrupt_run, tmp_path, capsys):
    from hs_scale.export.cli import main_export

    assert main_export(["--checkpoint", str(corrupt_run / "checkpoints" / STEP4), "--task", "copy",
                        "--out", str(tmp_path / "hf")]) == 2
    _corrupt_refusal(capsys.readouterr().err)
    assert not (tmp_path / "hf").exists()


def test_library_loads_refuse_a_corrupt_step_folder(corrupt_run):
    step4 = corrupt_run / "checkpoints" / STEP4
    with pytest.raises(CheckpointCorruptError, match=f"{STEP4}.*fails its checksum.*--no-verify"):
        load_full_model_state(step4)
    with pytest.raises(CheckpointCorruptError, match=f"{STEP4}.*fails its checksum"):
        CheckpointManager(step4.parent).load(step4, torch.nn.Linear(2, 2))


def test_ray_restore_refuses_a_corrupt_checkpoint(corrupt_run, tmp_path):
    from hs_scale.config import load_config
    from hs_scale.training.run import train

    cfg = load_config(TINY, ["--train.output_dir", str(tmp_path / "ray_run")])
    with pytest.raises(CheckpointCorruptError, match=f"{STEP4}.*fails its checksum"):
        train(cfg, resume_from=str(corrupt_run / "checkpoints" / STEP4))


def test_train_resume_and_init_from_refuse_a_corrupt_checkpoint(corrupt_run, tmp_path, capsys):
    # init_from a corrupt step folder: refused before anything is written.
    new = tmp_path / "new"
    assert cli_main(["train", "--config", TINY, "--train.output_dir", str(new), "--train.init_from",
                     str(corrupt_run / "checkpoints" / STEP4)]) == 2
    _corrupt_refusal(one_error_line(capsys.readouterr().err))
    assert not (new / "config.yaml").exists()
    # Resume with on_corrupt=raise: refused; with the default fallback: resumes step 2 with a warning.
    assert cli_main(["train", "--config", TINY, "--train.output_dir", str(corrupt_run), "--train.steps", "6",
                     "--train.on_corrupt", "raise"]) == 2
    _corrupt_refusal(one_error_line(capsys.readouterr().err))


def test_averaging_skips_unverified_checkpoints(corrupt_run, capsys):
    from hs_scale.evaluation.cli import resolve_checkpoints

    picked = resolve_checkpoints(None, str(corrupt_run / "checkpoints"), 2)
    assert [p.name for p in picked] == ["step_000000002"]
    assert f"skipping {corrupt_run / 'checkpoints' / STEP4}: file __0_0.distcp fails its checksum" in \
        capsys.readouterr().err


def test_retention_keeps_verified_checkpoints_over_a_corrupt_one(tmp_path):
    model = torch.nn.Linear(8, 8)
    ckpt = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        ckpt.save(step, model)
    flip_byte(tmp_path / "step_000000002" / "__0_0.distcp")  # bit rot in the middle one
    fresh = CheckpointManager(tmp_path, keep_last=3)  # a resumed run: knows nothing about these folders
    with pytest.warns(UserWarning, match=r"step_000000002 is incomplete or corrupt .* moved aside"):
        fresh.save(4, model)
    kept = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_") and ".corrupt-" not in p.name)
    assert kept == ["step_000000001", "step_000000003", "step_000000004"]  # 3 verified ones, none deleted early
    assert len(list(tmp_path.glob("step_000000002.corrupt-*"))) == 1  # moved aside, out of every listing
    assert [i.step for i in fresh.list_checkpoints()] == [1, 3, 4]


# ------------------------------------------------------------------------------------------------ disk full
@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3 MiB tmpfs: needs root (mount); skipped with the reason elsewhere."""
    if os.geteuid() != 0:
        pytest.skip("mounting a 3 MiB tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path, leave_bytes: int) -> Path:
    filler = mnt / "filler"
    free = shutil.disk_usage(mnt).free
    with filler.open("wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))
    return filler


def test_disk_full_save_cleans_up_and_names_the_intact_checkpoint(small_tmpfs):
    model = torch.nn.Linear(256, 256)  # 257 KiB of weights per checkpoint
    root = small_tmpfs / "ckpt"
    ckpt = CheckpointManager(root)
    ckpt.save(1, model)
    filler = _fill(small_tmpfs, 100 * 1024)
    with pytest.raises(CheckpointSaveError) as err:
        ckpt.save(2, model)
    message = str(err.value)
    assert "\n" not in message
    assert "saving checkpoint step 2 failed: no space left" in message, message
    assert "needs about 0.3 MiB" in message and "MiB free" in message, message
    assert f"last intact checkpoint is {root / 'step_000000001'}" in message, message
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000000001"]  # no .tmp- left behind
    filler.unlink()
    assert CheckpointManager(root).load_latest(torch.nn.Linear(256, 256))[0] == 1
    ckpt.save(2, model)  # space is back: saving works again, nothing to clean by hand


def test_disk_full_during_training_then_resume_without_manual_steps(small_tmpfs, capsys):
    out = small_tmpfs / "run"
    train = ["train", "--config", TINY, "--train.output_dir", str(out), "--train.steps"]
    assert cli_main([*train, "2"]) == 0
    filler = _fill(small_tmpfs, 300 * 1024)  # room for logs and heatmaps, not for an 0.8 MiB checkpoint
    capsys.readouterr()
    assert cli_main([*train, "4"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "saving checkpoint step 4 failed: no space left" in line and "step_000000002" in line, line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000000002"]
    filler.unlink()
    assert cli_main([*train, "4"]) == 0
    assert "resumed from step 2" in capsys.readouterr().out
    assert (out / "checkpoints" / "latest").read_text().strip() == STEP4


def test_stale_tmp_folders_of_a_killed_save_are_removed_at_start(good_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    stale = out / "checkpoints" / "step_000000006.tmp-deadbeef"
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"half")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli_main(["train", "--config", TINY, "--train.output_dir", str(out), "--train.steps", "5"]) == 0
    assert not stale.exists()
