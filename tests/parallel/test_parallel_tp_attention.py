"""Tensor-parallel selected-head attention equals the single-process layer, and selection costs no communication.

TP2 over gloo: forward output and every gradient (gathered to full shape) match `SelectedHeadAttention` with the
same weights and the same Gumbel draw within 1e-5; collectives per step are exactly the row-parallel all-reduce
(forward) and the column-parallel input-gradient all-reduce(s) (backward).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from support.harness import run_distributed  # noqa: E402

from hs_scale.parallel.tp_attention import shard_choice  # noqa: E402
from hs_scale.selection.selector import HeadSelector, select_heads, selection_noise  # noqa: E402

D, H, P, K = 32, 4, 8, 3
CASES = [
    dict(name="group-self-mask-causal", strategy="group", cross=False, mask=True, causal=True, tasks=[0, 2, 1, 2]),
    dict(name="subset-self", strategy="subset", cross=False, mask=False, causal=False, tasks=[1, 0, 1, 2]),
    dict(name="group-cross-mask", strategy="group", cross=True, mask=True, causal=False, tasks=[2, 0, 0, 1]),
    dict(name="subset-cross-one-task", strategy="subset", cross=True, mask=False, causal=False, tasks=[1, 1, 1, 1]),
    dict(name="dense-self-causal", strategy=None, cross=False, mask=True, causal=True, tasks=[0, 0, 0, 0]),
]


def _full_choice(sel: HeadSelector, layer: int, draw: int, partitions: int):
    """The single-process draw for a TP layout: plain group selection, balanced subset for `subset`."""
    noise = selection_noise(sel.seed, draw, sel.first_layer + layer, sel.num_tasks, sel.pool_heads)
    return select_heads(
        sel.logits[:, layer], sel.active_heads, sel.strategy, float(sel.temperature), noise, partitions=partitions
    )


# --- single process: per-rank selection reproduces the single-process draw -------------------------------------


@pytest.mark.parametrize("strategy", ["group", "subset"])
def test_rank_selection_is_a_slice_of_the_full_draw(strategy):
    torch.manual_seed(0)
    full = HeadSelector(K, 3, P, H, strategy=strategy, seed=11, first_layer=2)
    ranks = [full.part(rank=r, partitions=2) for r in range(2)]
    for draw in range(3):
        per_rank = [sel() for sel in ranks]
        for layer in range(3):
            ref = _full_choice(full, layer, draw, partitions=2)
            for r in range(2):
                want = shard_choice(ref, r, 2, P)
                assert torch.equal(per_rank[r][layer].heads, want.heads)
                torch.testing.assert_close(per_rank[r][layer].weights, want.weights)
    if strategy == "group":  # group selection is unchanged by the partitioning
        full.draws.zero_()
        plain = full()
        assert all(torch.equal(c.heads, _full_choice(full, i, 0, 2).heads) for i, c in enumerate(plain))


def test_tp1_is_the_plain_selector():
    for strategy in ("group", "subset"):
        torch.manual_seed(1)
        full = HeadSelector(K, 2, P, H, strategy=strategy, seed=3)
        torch.manual_seed(1)
        tp1 = HeadSelector(K, 2, P, H, strategy=strategy, seed=3, partitions=1, rank=0)
        assert torch.equal(tp1.logits, full.logits), "constructor draws phi like the single-process selector"
        for _ in range(2):
            for a, b in zip(full(), tp1(), strict=True):
                assert torch.equal(a.heads, b.heads) and torch.equal(a.weights, b.weights)
        full.eval(), tp1.eval()
        assert full.table() == tp1.table()


def test_constructor_slices_the_same_init_and_table_is_global():
    torch.manual_seed(4)
    full = HeadSelector(K, 2, P, H, strategy="subset")
    torch.manual_seed(4)
    rank1 = HeadSelector(K, 2, P, H, strategy="subset", partitions=2, rank=1)
    assert torch.equal(rank1.logits, full.logits[:, :, P // 2 :])
    assert rank1.logits.tensor_model_parallel and rank1.logits.partition_dim == 2
    rank1.eval()
    assert all(P // 2 <= h < P for per_task in rank1.table() for heads in per_task for h in heads)


def test_shard_choice_refuses_an_unbalanced_subset():
    heads = torch.tensor([[0, 1, 2, 3]])  # all four heads in rank 0's half of the pool
    with pytest.raises(ValueError, match="partitions=2"):
        shard_choice(select_heads.__globals__["HeadChoice"](heads, torch.ones(1, 4)), 1, 2, P)


# --- TP2 over gloo -----------------------------------------------------------------------------------------------


def _gather(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _tp_worker(rank: int, world_size: int, cases: list[dict]) -> dict:
    from support.collectives import CollectiveCounter

    from hs_scale.parallel.layout import ParallelConfig, init_parallel_groups
    from hs_scale.parallel.tp_attention import shard_attention
    from hs_scale.selection.attention import SelectedHeadAttention

    g = init_parallel_groups(ParallelConfig(tensor_parallel=2), seed=0)
    report = {}
    for case in cases:
        torch.manual_seed(42)
        dense_layer = case["strategy"] is None
        layer = SelectedHeadAttention(D, H, H if dense_layer else P)
        tp_layer = shard_attention(layer, g.tp)
        B, T, S = 4, 5, 7
        x = torch.randn(B, T, D)
        memory = torch.randn(B, S, D) if case["cross"] else None
        lengths = torch.tensor([S if case["cross"] else T, 3, 2, 4])
        mask = torch.arange(S if case["cross"] else T)[None] >= lengths[:, None] if case["mask"] else None
        task_B = torch.tensor(case["tasks"])
        probe = torch.randn(B, T, D)
        counts = {}

        if dense_layer:
            sel = tp_sel = choice = local = None
        else:
            sel = HeadSelector(K, 2, P, H, strategy=case["strategy"], seed=9)
            sel.draws.fill_(5)
            tp_sel = sel.part(rank=g.tp_rank, partitions=g.tp_size)
            choice = _full_choice(sel, 1, 5, partitions=2)
            with CollectiveCounter() as c:
                local = tp_sel()[1]
            counts["select"] = c.summary()

        kwargs = dict(task_B=task_B, key_padding_mask_BS=mask, causal=case["causal"])

        def run(module, ch, inputs, kwargs=kwargs):
            return module(inputs[0], choice=ch, memory_BSD=inputs[1], **kwargs)

        ref_in = [x.clone().requires_grad_(), None if memory is None else memory.clone().requires_grad_()]
        ref = run(layer, choice, ref_in)
        (ref * probe).sum().backward()

        tp_in = [x.clone().requires_grad_(), None if memory is None else memory.clone().requires_grad_()]
        with CollectiveCounter() as c:
            out = run(tp_layer, local, tp_in)
        counts["forward"] = c.summary()
        with CollectiveCounter() as c:
            (out * probe).sum().backward()
        counts["backward"] = c.summary()

        errs = {"out": (out - ref).abs().max().item(), "dx": (tp_in[0].grad - ref_in[0].grad).abs().max().item()}
        if memory is not None:
            errs["dmemory"] = (tp_in[1].grad - ref_in[1].grad).abs().max().item()
        for name in ("q_proj", "k_proj", "v_proj"):
            for p in ("weight", "bias"):
                full = _gather(getattr(getattr(tp_layer, name), p).grad, 0, g.tp)
                errs[f"{name}.{p}"] = (full - getattr(getattr(layer, name), p).grad).abs().max().item()
        errs["out_proj.weight"] = (
            (_gather(tp_layer.out_proj.weight.grad, 1, g.tp) - layer.out_proj.weight.grad).abs().max().item()
        )
        errs["out_proj.bias"] = (tp_layer.out_proj.bias.grad - layer.out_proj.bias.grad).abs().max().item()
        errs["grad_norm"] = min(
            layer.q_proj.weight.grad.abs().max().item(), layer.v_proj.weight.grad.abs().max().item()
        )
        if sel is not None:
            errs["phi"] = (_gather(tp_sel.logits.grad, 2, g.tp) - sel.logits.grad).abs().max().item()
            errs["phi_grad_norm"] = sel.logits.grad.abs().max().item()  # the comparison must not be vacuous
            errs["heads_match"] = float(torch.equal(local.heads, shard_choice(choice, g.tp_rank, 2, P).heads))
        report[case["name"]] = {"errs": errs, "counts": counts}
    return report


@pytest.mark.slow
def test_tp2_attention_matches_single_process_and_counts_collectives():
    reports = run_distributed(_tp_worker, 2, args=(CASES,), timeout_s=180)
    for case in CASES:
        for rank, report in enumerate(reports):
            got = report[case["name"]]
            errs, counts = got["errs"], got["counts"]
            where = f"{case['name']} rank {rank}: {got}"
            for key, err in errs.items():
                if key in ("phi_grad_norm", "grad_norm"):
                    assert err > 1e-4, where
                elif key == "heads_match":
                    assert err == 1.0, where
                else:
                    assert err < 1e-5, f"{key} differs by {err}; {where}"
            # Selection is local: no collective at all.
            assert counts.get("select", {}) == {}, where
            # Forward: only the row-parallel all-reduce of out_proj.
            assert counts["forward"] == {"all_reduce@2": 1}, where
            # Backward: the column-parallel input-grad all-reduce (x; plus memory for cross-attention).
            assert counts["backward"] == {"all_reduce@2": 2 if case["cross"] else 1}, where
