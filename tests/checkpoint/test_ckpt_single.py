"""Single-process checkpoints: exact resume, keep-last-K, consolidation, and the on-disk format."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from ckpt_models import eval_loss, flat_params, optimizer_for, small_s2t, train_step  # noqa: E402

from hs_scale.checkpoint import CheckpointManager, load_full_model_state  # noqa: E402


def _run(model, optimizer, scheduler, steps):
    return [train_step(model, optimizer, scheduler, s) for s in steps]


def test_resume_is_bitwise_identical(tmp_path):
    """Model, AdamW state, LambdaLR, selector draw counter and RNG (dropout) all come back exactly."""
    model = small_s2t(seed=0)
    optimizer, scheduler = optimizer_for(model)
    _run(model, optimizer, scheduler, [0, 1])
    ckpt = CheckpointManager(tmp_path, keep_last=2)
    loader_state = {"consumed": 2, "task_samples": {"asr": 5}, "shape": (1, 2), "rows": np.arange(3)}
    ckpt.save(2, model, optimizer, scheduler, extra_per_rank={"loader": loader_state}, config={"model": {"d": 32}})
    py_draw, np_draw = random.random(), np.random.rand()
    want = _run(model, optimizer, scheduler, [2, 3])
    want_params = flat_params(model)

    fresh = small_s2t(seed=123)  # different weights and RNG history: everything must come from the checkpoint
    opt2, sched2 = optimizer_for(fresh)
    step, extra = ckpt.load_latest(fresh, opt2, sched2)
    assert step == 2
    assert extra["loader"]["shape"] == (1, 2) and extra["loader"]["task_samples"] == {"asr": 5}
    np.testing.assert_array_equal(extra["loader"]["rows"], np.arange(3))
    assert (random.random(), np.random.rand()) == (py_draw, np_draw)
    assert int(fresh.selectors["encoder_self"].draws) == 2
    got = _run(fresh, opt2, sched2, [2, 3])
    assert got == want, (got, want)
    for name, p in fresh.named_parameters():
        assert torch.equal(p, want_params[name]), name
    assert sched2.get_last_lr() == scheduler.get_last_lr()


def test_keep_last_and_listing(tmp_path):
    model = small_s2t(seed=0, dropout=0.0)
    optimizer, scheduler = optimizer_for(model)
    ckpt = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        ckpt.save(step, model, optimizer, scheduler)
    infos = ckpt.list_checkpoints()
    assert [i.step for i in infos] == [20, 30]
    assert [i.latest for i in infos] == [False, True] and all(i.complete for i in infos)
    assert (tmp_path / "latest").read_text().strip() == "step_000000030"
    assert ckpt.verify(infos[-1].path) is None


def test_consolidated_state_loads_into_a_plain_model(tmp_path):
    model = small_s2t(seed=0)
    optimizer, scheduler = optimizer_for(model)
    _run(model, optimizer, scheduler, [0])
    CheckpointManager(tmp_path).save(1, model, optimizer, scheduler, config={"arch": "s2t"})
    config, state = load_full_model_state(tmp_path)
    assert config == {"arch": "s2t"}
    ref = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    assert set(state) == set(ref)
    assert all(torch.equal(state[k], ref[k]) for k in ref)
    other = small_s2t(seed=5)
    other.load_state_dict(state)
    assert eval_loss(other) == eval_loss(model)


def test_layout_of_a_checkpoint_folder(tmp_path):
    """What is on disk: no pickle besides DCP's allow-listed .metadata; selector logits split per layer."""
    model = small_s2t(seed=0, dropout=0.0)
    optimizer, scheduler = optimizer_for(model)
    _run(model, optimizer, scheduler, [0])
    path = CheckpointManager(tmp_path).save(1, model, optimizer, scheduler)
    names = sorted(p.name for p in path.iterdir())
    assert names == sorted(
        [
            ".metadata",
            "__0_0.distcp",
            "COMPLETE",
            "config.json",
            "meta.json",
            "rank_00000.json",
            "rank_00000.safetensors",
            "trainer.json",
        ]
    )
    from hs_scale.checkpoint.safe_io import read_dcp_metadata

    keys = set(read_dcp_metadata(path).state_dict_metadata)
    assert {"model.selectors.cross.logits.layer_0000", "model.selectors.cross.logits.layer_0001"} <= keys
    assert "optim.exp_avg.selectors.cross.logits.layer_0001" in keys and "optim.step.selectors.cross.logits" in keys
    assert "optim.exp_avg_sq.decoder.layers.1.fc1.weight" in keys
    marker = json.loads((path / "COMPLETE").read_text())
    assert set(marker["files"]) == set(names) - {"COMPLETE"}
