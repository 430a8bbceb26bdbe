"""Untrusted and malformed configs: every refusal is one `error:` line naming the field (or file) and the fix, at load
time, with exit code 2 - never a traceback, never a silently ignored value."""

from __future__ import annotations

import pytest
from rel_helpers import TINY, one_error_line

from hs_scale.cli import main as cli_main


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--selection.temperature", ".nan"], "selection.temperature=nan: must be a finite number"),
        (["--train.clip_norm", ".nan"], "train.clip_norm=nan: must be a finite number"),
        (["--train.lr", ".nan"], "train.lr=nan: must be a finite number"),
        (["--train.lr", ".inf"], "train.lr=inf: must be a finite number"),
        (["--train.weight_decay", "-1"], "train.weight_decay=-1.0 is out of range: must be a finite number >= 0"),
        (["--train.min_lr_ratio", "5"], "train.min_lr_ratio=5.0 is out of range: must be a finite number in [0, 1]"),
        (["--train.eps", "-1"], "train.eps=-1.0 is out of range: must be a finite number > 0"),
        (["--parallel.tensor_parallel", "0"], "parallel.tensor_parallel=0 is out of range: must be >= 1"),
        (["--parallel.pipeline_parallel", "-2"], "parallel.pipeline_parallel=-2 is out of range: must be >= 1"),
        (["--train..steps", "3"], "'train..steps' is not a field name"),
        (["--train.steps", "!!python/object/apply:os.system [touch PWNED]"], "override --train.steps: cannot read"),
        (["--train.steps", "[1, 2"], "override --train.steps: cannot read"),
        (["--train", "3", "--train.steps", "4"], "train was already given a value"),
        (["--train.resume", "sometimes"], "train.resume='sometimes' is unknown; use one of"),
    ],
)
def test_bad_values_are_refused_in_one_line(overrides, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a YAML tag that ran would leave PWNED here
    assert cli_main(["show-config", "--config", TINY, *overrides]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert message in line, line
    assert not (tmp_path / "PWNED").exists()


def _config_file(tmp_path, data: bytes):
    path = tmp_path / "c.yaml"
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda t: _config_file(t, b"- model\n- train\n"), "holds a list, not a mapping of sections"),
        (lambda t: str(t), "is a directory; pass a YAML file"),
        (lambda t: _config_file(t, b"train:\n  output_dir: \xff\xfe\n"), "is not UTF-8 text"),
        (lambda t: _config_file(t, b"train:\n  steps: 1\ntrain:\n  steps: 2\n"), "duplicate key 'train'"),
        (lambda t: _config_file(t, b"train: {steps: 1, steps: 2}\n"), "duplicate key 'steps'"),
        (lambda t: str(t / "missing.yaml"), "does not exist"),
    ],
)
def test_bad_config_files_are_refused_in_one_line(make, message, capsys, tmp_path):
    assert cli_main(["show-config", "--config", make(tmp_path)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert message in line, line


def test_an_old_boolean_resume_still_loads(capsys):
    assert cli_main(["show-config", "--config", TINY, "--train.resume", "false"]) == 0
    assert "resume: never" in capsys.readouterr().out
