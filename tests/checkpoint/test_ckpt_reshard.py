"""Resharding: a checkpoint saved at TP2 x PP2 (4 gloo ranks, megatron schedules) loads at TP1 x PP2 (2 ranks)
and at TP1 x PP1 (one process, the plain single-device model) with the same evaluation loss, the same draw
counters, and optimizer state that continues training identically (within float reassociation: TP sums).
Also: resuming at the saving layout is bitwise identical to not stopping.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
pytest.importorskip("megatron.core")

from ckpt_models import VOCAB, small_s2t  # noqa: E402
from support.harness import run_distributed  # noqa: E402

PAD, EPS, N_MICRO, LR = 1, 0.1, 2, 1e-3


def _microbatches(seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(N_MICRO):
        T, L = 12 - 2 * i, 6 - i % 2
        tgt = torch.randint(4, VOCAB, (2, L), generator=g)
        tgt[1, L - 2 :] = PAD
        out.append(
            SimpleNamespace(
                features=torch.randn(2, T, 8, generator=g),
                feature_lengths=torch.tensor([T, T - 3]),
                decoder_input=torch.cat([torch.full((2, 1), 2), tgt[:, :-1]], dim=1),
                target=tgt,
                src_task=torch.tensor([i % 3, 2]),
                tgt_task=torch.tensor([1, (i + 1) % 3]),
            )
        )
    return out


def _engine(tp: int, pp: int, seed: int, groups=None):
    from hs_scale.parallel.layout import ParallelConfig, init_parallel_groups
    from hs_scale.training.engine import StepEngine

    pcfg = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
    groups = groups or init_parallel_groups(pcfg, seed=0)
    model = small_s2t(seed, dropout=0.0)
    return StepEngine(model, _train_config(), model.selection_config, pcfg, groups, 3, torch.device("cpu")), groups


def _train_config():
    from hs_scale.training.config import TrainConfig

    return TrainConfig(lr=LR, warmup_steps=0, schedule="constant", clip_norm=0.0, label_smoothing=EPS)


def _train_step(engine, microbatches) -> float:
    return engine.train_step(microbatches).loss


def _eval_loss(engine, microbatches) -> float:
    for mb in microbatches:
        mb.is_padding = False
    return engine.evaluate(microbatches, ["a", "b", "c"])["loss"]


def _draws(engine) -> dict:
    return {f"{n}@{s.first_layer}": int(s.draws) for m in engine.modules for n, s in m.selectors.items()}


def _save_worker(rank: int, world_size: int, root: str) -> dict:
    from hs_scale.checkpoint import CheckpointManager
    engine, groups = _engine(2, 2, seed=0)
    for step in range(2):
        _train_step(engine, _microbatches(100 + step))
    evals = _eval_loss(engine, _microbatches(7))
    ckpt = CheckpointManager(root, keep_last=2)
    ckpt.save(2, engine.modules, engine.optimizer, extra_per_rank={"rank": rank}, config={"tp": 2}, groups=groups)
    draws = _draws(engine)
    after = _train_step(engine, _microbatches(102))

    fresh, _ = _engine(2, 2, seed=1, groups=groups)  # different init: everything below comes from the checkpoint
    step, extra = ckpt.load_latest(fresh.modules, fresh.optimizer, groups=groups)
    resumed = _train_step(fresh, _microbatches(102))
    params = [[p for m in e.modules for p in m.parameters()] for e in (engine, fresh)]
    same = all(torch.equal(a, b) for a, b in zip(*params, strict=True))
    return {
        "eval": evals,
        "after": after,
        "resumed": resumed,
        "same_params": same,
        "step": step,
        "extra": extra,
        "draws": draws,
    }


def _load_worker(rank: int, world_size: int, root: str, tp: int, pp: int) -> dict:
    from hs_scale.checkpoint import CheckpointManager
    engine, groups = _engine(tp, pp, seed=3)
    step, extra = CheckpointManager(root).load_latest(engine.modules, engine.optimizer, groups=groups)
    draws = _draws(engine)
    return {
        "step": step,
        "extra": extra,
        "eval": _eval_loss(engine, _microbatches(7)),
        "after": _train_step(engine, _microbatches(102)),
        "draws": draws,
    }


def _dense_loss(model, microbatches, train: bool) -> float:
    tokens = sum(int(mb.target.ne(PAD).sum()) for mb in microbatches)
    model.train(train)
    total = 0.0
    for mb in microbatches:
        logits = model(mb.features, mb.feature_lengths, mb.decoder_input, mb.src_task, mb.tgt_task)
        loss = (
            torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), mb.target.flatten(), ignore_index=PAD, label_smoothing=EPS, reduction="sum"
            )
            / tokens
        )
        if train:
            loss.backward()
        total += loss.item()
    return total


@pytest.mark.slow
def test_tp2pp2_checkpoint_reshards_to_tp1pp2_and_tp1pp1(tmp_path):
    from hs_scale.checkpoint import CheckpointManager

    saved = run_distributed(_save_worker, 4, args=(str(tmp_path),), timeout_s=300)
    for rank, r in enumerate(saved):
        assert r["step"] == 2 and r["extra"] == {"rank": rank}
        assert r["resumed"] == r["after"], "resume at the same layout must be bitwise identical"
        assert r["same_params"]
    ref_eval, ref_after = saved[0]["eval"], saved[0]["after"]
    ref_draws = {k: v for r in saved for k, v in r["draws"].items()}

    # TP1 x PP2: the data-parallel size is unchanged (1), so each rank gets the extra of a rank with its dp rank.
    loaded = run_distributed(_load_worker, 2, args=(str(tmp_path), 1, 2), timeout_s=240)
    for r in loaded:
        assert r["step"] == 2 and r["extra"] is not None
        assert abs(r["eval"] - ref_eval) < 1e-6, (r["eval"], ref_eval)
        assert abs(r["after"] - ref_after) < 1e-5, "optimizer state must reshard too"
    assert {k: v for r in loaded for k, v in r["draws"].items()} == ref_draws

    # TP1 x PP1: the plain single-device model in this process (padded vocabulary rows are dropped).
    dense = small_s2t(seed=5, dropout=0.0)
    from hs_scale.training.optim import build_optimizer

    optimizer, _ = build_optimizer(dense, _train_config())  # the trainer's AdamW, as in every layout
    step, _ = CheckpointManager(tmp_path).load_latest(dense, optimizer)
    assert step == 2 and dense.decoder.embed_tokens.weight.shape[0] == VOCAB
    with torch.no_grad():
        assert abs(_dense_loss(dense, _microbatches(7), train=False) - ref_eval) < 1e-6
    assert {f"{n}@0": int(s.draws) for n, s in dense.selectors.items()} == ref_draws
    after = _dense_loss(dense, _microbatches(102), train=True)
    optimizer.step()
    assert abs(after - ref_after) < 1e-5
