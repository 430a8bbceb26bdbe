"""train.wandb=offline: a run logs its metrics (per-task losses, the selection temperature, evaluation) and the
selection table to Weights & Biases files under the output dir, without a network; the JSONL log is unchanged."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("wandb")

from hs_scale.config import load_config  # noqa: E402
from hs_scale.training.run import train  # noqa: E402


def test_offline_wandb_run_holds_the_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # belt and braces: never reach a network from the tests
    out = tmp_path / "run"
    cfg = load_config("configs/synthetic.yaml", [
        "--train.steps=4", "--train.log_every=1", "--train.eval_every=2", "--train.save_every=4",
        "--train.progress_bar=false", "--train.threads=1", "--train.wandb=offline", f"--train.output_dir={out}",
        "--model.d_model=32", "--model.ffn_dim=64", "--model.encoder_layers=1", "--model.decoder_layers=1",
    ])
    train(cfg)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # The run's record log (what `wandb sync` uploads): W&B's protobuf records, in which every history key and
    # value is a UTF-8 JSON string. wandb >= 0.20 has no Python reader for it, so look for them as bytes.
    (log,) = runs[0].glob("run-*.wandb")
    data = log.read_bytes()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in (r for r in records if r["kind"] == "train"):
        assert json.dumps(r["loss"]).encode() in data, r["step"]  # every step's training loss
    for key in (b"train/loss", b"train/temperature", b"train/nll_per_task/copy", b"eval/nll_per_task/copy",
                b"pool_heads"):  # per-task losses, the temperature, evaluation, the run's config
        assert key in data, key
    # The selection table of each evaluation (steps 2 and 4), as W&B table files.
    tables = sorted(runs[0].glob("files/media/table/selection_*.table.json"))
    assert [t.name.split("_")[1] for t in tables] == ["2", "4"]
    last = json.loads(tables[-1].read_text())
    assert last["columns"] == ["site", "task", "layer", "heads"]
    assert len(last["data"]) == 3 * 4  # 3 sites x 4 tasks x 1 layer
    assert {row[0] for row in last["data"]} == {"encoder_self", "decoder_self", "cross"}
    selection_txt = (out / "selection.txt").read_text()
    assert all(row[3] in selection_txt for row in last["data"])  # the same heads as selection.txt
