"""One training step of a small S2T model with head selection, TP2 / DP2 (megatron DDP) / DP2 (DeepSpeed ZeRO-2)
over gloo, equals the single-process model with the same seed and the same Gumbel draws.

Checked: loss, every gradient (gathered to full shape) within 1e-5, the selected heads per task, the collectives
per step against what the layout needs (selection adds none), and for DP that replicas stay bitwise identical
over several optimizer steps (and track the single-process AdamW run).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("megatron.core")

from support.harness import run_distributed  # noqa: E402
from support.models import DEC, ENC, VOCAB, small_s2t  # noqa: E402


def _batch():
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(4, 12, 8, generator=g)
    lengths = torch.tensor([12, 9, 11, 6])
    tgt = torch.randint(4, VOCAB, (4, 6), generator=g)
    tgt[1, 4:] = 1  # padding (pad id 1)
    tgt[3, 3:] = 1
    dec_in = torch.cat([torch.full((4, 1), 2), tgt[:, :-1]], dim=1)
    return feats, lengths, dec_in, tgt, torch.tensor([0, 2, 1, 2]), torch.tensor([1, 1, 0, 2])


def _step(model, batch):
    from hs_scale.training.loss import sequence_loss

    feats, lengths, dec_in, tgt, src_task, tgt_task = batch
    logits = model(feats, lengths, dec_in, src_task_B=src_task, tgt_task_B=tgt_task)
    loss, _ = sequence_loss(logits, tgt, pad_id=1, label_smoothing=0.1)
    return loss


def _tp_model_worker(rank: int, world_size: int, strategy: str) -> dict:
    from _tp_helpers import expected_tp_collectives, gather_tp_tensor
    from support.collectives import CollectiveCounter

    from hs_scale.parallel.layout import ParallelConfig, init_parallel_groups
    from hs_scale.parallel.tp_model import parallelize_tensor

    groups = init_parallel_groups(ParallelConfig(tensor_parallel=2), seed=0)
    torch.manual_seed(0)
    dense = small_s2t(strategy)
    tp = parallelize_tensor(copy.deepcopy(dense), groups)
    batch = _batch()

    ref_loss = _step(dense, batch)
    ref_loss.backward()
    with CollectiveCounter() as fwd:
        loss = _step(tp, batch)
    with CollectiveCounter() as bwd:
        loss.backward()

    dense_params = dict(dense.named_parameters())
    errs, missing = {}, []
    for name, p in tp.named_parameters():
        if p.grad is None:
            missing.append(name)
            continue
        full = gather_tp_tensor(p.grad, p, groups.tp)
        errs[name] = (full - dense_params[name].grad).abs().max().item()
    dense.eval(), tp.eval()
    tables = {}
    for name, selector in tp.selectors.items():
        local = selector.table()  # [task][layer] -> this rank's slots, global head ids
        everyone = [None] * world_size
        torch.distributed.all_gather_object(everyone, local, group=groups.tp)
        tables[name] = [
            [sum((everyone[r][k][layer] for r in range(world_size)), []) for layer in range(len(local[0]))]
            for k in range(len(local))
        ]
    return {
        "loss": loss.item(),
        "ref_loss": ref_loss.item(),
        "errs": errs,
        "missing": missing,
        "tables_match": tables == dense.head_selection_table(),
        "forward": fwd.summary(),
        "backward": bwd.summary(),
        "expected": expected_tp_collectives(ENC, DEC),
        "phi_grad": dense.selectors["encoder_self"].logits.grad.abs().max().item(),
    }


@pytest.mark.slow
def test_tp2_s2t_step_matches_single_process():
    # NOTE: group strategy only. The balanced subset under TP equals select_heads(partitions=t), which the
    # single-process HeadSelector cannot be asked for yet; test_parallel_tp_attention covers it per layer.
    res = run_distributed(_tp_model_worker, 2, args=("group",), timeout_s=180)
    for rank, r in enumerate(res):
        assert abs(r["loss"] - r["ref_loss"]) < 1e-5, (rank, r["loss"], r["ref_loss"])
        assert not r["missing"], r["missing"]
        bad = {k: v for k, v in r["errs"].items() if v >= 1e-5}
        assert not bad, f"rank {rank}: gradients differ: {bad}"
        assert r["phi_grad"] > 0
        assert r["tables_match"], f"rank {rank}: selected heads differ"
        # Only TP all-reduces: one per attention/FFN forward, one per attention input / FFN input backward.
        assert r["forward"] == {"all_reduce@2": r["expected"]["forward"]}, r["forward"]
        assert r["backward"] == {"all_reduce@2": r["expected"]["backward"]}, r["backward"]


# --- data parallel -----------------------------------------------------------------------------------------------


def _loss_sum(model, batch):
    from hs_scale.training.loss import sequence_loss

    feats, lengths, dec_in, tgt, src_task, tgt_task = batch
    logits = model(feats, lengths, dec_in, src_task_B=src_task, tgt_task_B=tgt_task)
    mean, _ = sequence_loss(logits, tgt, pad_id=1, label_smoothing=0.1)
    return mean * tgt.ne(1).sum()


def _rows(batch, rows):
    return tuple(t[rows] for t in batch)


def _dp_worker(rank: int, world_size: int, engine_name: str, steps: int) -> dict:
    from support.collectives import CollectiveCounter
    from support.dp_engines import adamw, build_engine

    from hs_scale.parallel.layout import ParallelConfig, init_parallel_groups

    cfg = ParallelConfig(engine=engine_name, zero_stage=2 if engine_name == "deepspeed" else 0)
    groups = init_parallel_groups(cfg, seed=0)
    torch.manual_seed(0)
    dense = small_s2t("group")
    model = copy.deepcopy(dense)
    engine = build_engine(model, cfg, groups, lr=1e-3)
    ref_opt = adamw(dense.parameters(), lr=1e-3)
    batch = _batch()
    local = _rows(batch, slice(2 * rank, 2 * rank + 2))
    local_tokens = int(local[3].ne(1).sum())
    total_tokens = batch[3].ne(1).sum()

    grads, losses, ref_losses, counts = {}, [], [], {}
    for step in range(steps):
        ref_loss = _loss_sum(dense, batch) / total_tokens
        ref_loss.backward()
        ref_losses.append(ref_loss.item())
        if step == 0:
            ref_grads = {n: p.grad.clone() for n, p in dense.named_parameters()}
            keep = lambda named: grads.update({n: g.detach().clone() for n, g in named.items()})  # noqa: E731
            losses.append(engine.step(lambda m: _loss_sum(m, local), local_tokens, inspect_grads=keep))
        else:
            with CollectiveCounter() as c:
                losses.append(engine.step(lambda m: _loss_sum(m, local), local_tokens))
            counts = c.summary()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)

    grad_errs = {n: (grads[n].float() - g).abs().max().item() for n, g in ref_grads.items()}
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(world_size)]
    torch.distributed.all_gather(everyone, flat)
    ref_flat = torch.cat([p.detach().flatten() for p in dense.parameters()])
    model.eval(), dense.eval()
    return {
        "losses": losses,
        "ref_losses": ref_losses,
        "grad_errs": grad_errs,
        "replicas_identical": all(torch.equal(everyone[0], e) for e in everyone),
        "param_err": (flat - ref_flat).abs().max().item(),
        "counts": counts,
        "tables_match": model.head_selection_table() == dense.head_selection_table(),
        "moved": (ref_flat - torch.cat([p.detach().flatten() for p in _initial_params()])).abs().max().item(),
    }


def _initial_params():
    """The parameters every run starts from (same seed as the workers)."""
    torch.manual_seed(0)
    return list(small_s2t("group").parameters())


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["megatron_ddp", "deepspeed"])
def test_dp2_steps_match_single_process(engine):
    steps = 3
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    res = run_distributed(_dp_worker, 2, args=(engine, steps), timeout_s=240)
    for rank, r in enumerate(res):
        where = f"{engine} rank {rank}"
        bad = {k: v for k, v in r["grad_errs"].items() if v >= 1e-5}
        assert not bad, f"{where}: gradients differ from the single-process full batch: {bad}"
        for got, want in zip(r["losses"], r["ref_losses"], strict=True):
            assert abs(got - want) < 1e-5, (where, r["losses"], r["ref_losses"])
        assert r["replicas_identical"], f"{where}: data-parallel replicas diverged"
        assert r["moved"] > 1e-4, "the optimizer must have changed the parameters"
        assert r["param_err"] < 1e-5, f"{where}: parameters drift from the single-process run by {r['param_err']}"
        assert r["tables_match"], f"{where}: selected heads differ"
    if engine == "megatron_ddp":
        # token count + reported loss + one gradient bucket; no all-gather, nothing else.
        expected = {"all_reduce@2": 3}
    else:
        # token count + reported loss + ZeRO-2's two all-reduces on CPU (gradient bucket, overflow check, as
        # measured with DeepSpeed 0.19) + one all-gather of the updated parameter partitions.
        expected = {"all_reduce@2": 4, "all_gather_into_tensor@2": 1}
    assert all(r["counts"] == expected for r in res), [r["counts"] for r in res]
