"""`hs-scale evaluate` from anywhere: relative data paths stored in a checkpoint are read from the folder the
training ran in, and `--data.FIELD` overrides replace them; other sections cannot be overridden."""

from __future__ import annotations

from pathlib import Path

import pytest

from hs_scale.evaluation.cli import data_overrides, rebase_data_paths, training_folder


def _run_tree(root: Path) -> Path:
    """root/runs/demo/checkpoints/step_000000010 and root/runs/demo/corpus/{manifest.parquet,tokenizer.model}."""
    step = root / "runs" / "demo" / "checkpoints" / "step_000000010"
    step.mkdir(parents=True)
    corpus = root / "runs" / "demo" / "corpus"
    corpus.mkdir()
    (corpus / "manifest.parquet").write_bytes(b"")
    (corpus / "tokenizer.model").write_bytes(b"")
    return step


def test_training_folder_is_the_checkpoint_path_minus_the_output_dir(tmp_path):
    step = _run_tree(tmp_path)
    assert training_folder(step, "runs/demo") == tmp_path
    assert training_folder(step.parent, "runs/demo") == tmp_path  # a checkpoint root
    assert training_folder(step, "other/demo") is None  # the path does not end in the output dir
    assert training_folder(step, "/abs/runs/demo") is None  # absolute output dirs need no rebasing


def test_relative_corpus_paths_resolve_from_another_folder(tmp_path, monkeypatch):
    step = _run_tree(tmp_path / "repo")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = {"train": {"output_dir": "runs/demo"},
           "data": {"manifest": "runs/demo/corpus", "tokenizer": "runs/demo/corpus/tokenizer.model"}}
    rebased = rebase_data_paths(cfg, step)
    assert rebased["data"]["manifest"] == str(tmp_path / "repo" / "runs/demo/corpus")
    assert rebased["data"]["tokenizer"] == str(tmp_path / "repo" / "runs/demo/corpus/tokenizer.model")
    assert cfg["data"]["manifest"] == "runs/demo/corpus"  # the input is not modified


def test_paths_that_exist_here_or_are_remote_are_kept(tmp_path, monkeypatch):
    step = _run_tree(tmp_path)
    monkeypatch.chdir(tmp_path)  # the training folder itself: the relative path works as it is
    cfg = {"train": {"output_dir": "runs/demo"}, "data": {"manifest": "runs/demo/corpus", "tokenizer": ""}}
    assert rebase_data_paths(cfg, step)["data"]["manifest"] == "runs/demo/corpus"
    remote = {"train": {"output_dir": "runs/demo"}, "data": {"manifest": "s3://bucket/corpus"}}
    assert rebase_data_paths(remote, step)["data"]["manifest"] == "s3://bucket/corpus"


def test_data_overrides_accept_data_fields_only():
    assert data_overrides(["--data.manifest", "/x/corpus", "--data.batch_size=8"]) == {
        "data": {"manifest": "/x/corpus", "batch_size": 8}}
    assert data_overrides([]) == {}
    with pytest.raises(ValueError, match="only --data.FIELD"):
        data_overrides(["--model.d_model", "64"])
    with pytest.raises(ValueError, match="unrecognized argument --bem"):
        data_overrides(["--bem", "5"])
