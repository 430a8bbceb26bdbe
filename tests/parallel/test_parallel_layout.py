"""Layout validation refuses bad layouts at config time with actionable messages; process groups match the layout."""

from __future__ import annotations

import pytest
from support.harness import run_distributed

from hs_scale.parallel.layout import (
    LayoutError,
    ParallelConfig,
    check_engine,
    check_heads,
    check_pipeline,
    check_vocab,
    check_world,
    padded_vocab_size,
    validate_layout,
)

GOOD = dict(num_heads=4, pool_heads=8, encoder_layers=12, decoder_layers=6, ffn_dim=2048, vocab_size=1000)


def test_valid_layouts_return_data_parallel_size():
    assert validate_layout(ParallelConfig(), world_size=1, cuda=False, **GOOD) == 1
    assert (
        validate_layout(ParallelConfig(tensor_parallel=2, pipeline_parallel=2), world_size=8, cuda=False, **GOOD) == 2
    )
    cfg = ParallelConfig(tensor_parallel=4, data_parallel=2, engine="deepspeed", zero_stage=2, bf16=True)
    assert validate_layout(cfg, world_size=8, cuda=False, **GOOD) == 2


@pytest.mark.parametrize(
    "cfg, world, overrides, expected",
    [
        (
            ParallelConfig(tensor_parallel=3),
            3,
            {},
            ["H=4 is not divisible by tensor_parallel=3", "use tensor_parallel in [1, 2, 4]"],
        ),
        (
            ParallelConfig(tensor_parallel=4),
            4,
            {"pool_heads": 6},
            ["H'=6 is not divisible", "tensor_parallel in [1, 2]"],
        ),
        (
            ParallelConfig(tensor_parallel=8),
            8,
            {"num_heads": 8, "pool_heads": 12},
            ["H'=12 is not divisible by tensor_parallel=8"],
        ),
        (
            ParallelConfig(pipeline_parallel=4),
            4,
            {},
            ["18 layers cannot be split", "pick pp*vp in [1, 2, 3, 6, 9, 18]"],
        ),
        (
            ParallelConfig(pipeline_parallel=2, virtual_pipeline=3),
            2,
            {"num_microbatches": 3},
            ["(train.grad_accum) to be a multiple of pipeline_parallel=2", "set train.grad_accum=2"],
        ),
        (ParallelConfig(tensor_parallel=2), 2, {"vocab_size": 1001}, ["pad it to 1002"]),
        (ParallelConfig(tensor_parallel=2), 2, {"ffn_dim": 1023}, ["use ffn_dim=1024"]),
        (
            ParallelConfig(tensor_parallel=2, pipeline_parallel=2),
            6,
            {},
            ["world size 6 is not a multiple of", "tensor_parallel*pipeline_parallel in [1, 2, 3, 6]"],
        ),
        (ParallelConfig(tensor_parallel=2, data_parallel=3), 4, {}, ["set data_parallel=2 or leave it unset"]),
        (ParallelConfig(engine="horovod"), 1, {}, ["use one of ('megatron_ddp', 'deepspeed')"]),
        (ParallelConfig(zero_stage=2), 1, {}, ["set engine=deepspeed"]),
        (ParallelConfig(engine="deepspeed", zero_stage=3), 1, {}, ["use 0, 1 or 2"]),
        (
            ParallelConfig(engine="deepspeed", pipeline_parallel=2),
            2,
            {},
            ["set pipeline_parallel=1 or engine=megatron_ddp"],
        ),
        (ParallelConfig(engine="deepspeed", zero_stage=1, bf16=True), 1, {}, ["set zero_stage=2 or bf16=false"]),
        (ParallelConfig(distributed_optimizer=True), 2, {}, ["distributed_optimizer=false"]),
        (ParallelConfig(sequence_parallel=True, tensor_parallel=2), 2, {}, ["set sequence_parallel=false"]),
    ],
)
def test_invalid_layouts_are_refused_with_the_fix(cfg, world, overrides, expected):
    with pytest.raises(LayoutError) as err:
        validate_layout(cfg, world_size=world, cuda=False, **{**GOOD, **overrides})
    for fragment in expected:
        assert fragment in str(err.value)


def test_all_problems_are_reported_at_once():
    cfg = ParallelConfig(tensor_parallel=3, pipeline_parallel=4, zero_stage=1)
    with pytest.raises(LayoutError) as err:
        validate_layout(cfg, world_size=12, cuda=False, **GOOD)
    msg = str(err.value)
    assert "tensor_parallel=3" in msg and "cannot be split" in msg and "engine=deepspeed" in msg
    assert msg.count("\n  - ") >= 4


def test_plain_checks_and_vocab_padding():
    assert check_world(8, 2, 2) == [] and check_world(8, 2, 2, 2) == []
    assert check_heads(4, 8, 4) == [] and check_heads(4, 8, 2, "subset") == []
    assert check_pipeline(12, 6, 2) == [] and check_pipeline(12, 6, 3, 2, num_microbatches=6) == []
    assert padded_vocab_size(1000, 1) == 1000
    assert padded_vocab_size(1001, 2) == 1002
    assert padded_vocab_size(1001, 4, divisible_by=128) == 1024
    assert check_vocab(padded_vocab_size(5003, 8), 8) == []
    assert check_engine(ParallelConfig(distributed_optimizer=True), cuda=True) == []


def test_batch_p2p_comm_defaults_off_on_gloo():
    cfg = ParallelConfig(pipeline_parallel=2, virtual_pipeline=2)
    assert cfg.resolved_batch_p2p_comm("gloo") is False  # interleaved PP is silently wrong with True on gloo
    assert cfg.resolved_batch_p2p_comm("nccl") is True
    assert ParallelConfig(batch_p2p_comm=True).resolved_batch_p2p_comm("gloo") is True


def _groups_worker(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from hs_scale.parallel.layout import ParallelConfig, init_parallel_groups

    g = init_parallel_groups(ParallelConfig(tensor_parallel=2, pipeline_parallel=2), seed=3)
    return {
        "tp": dist.get_process_group_ranks(g.tp),
        "pp": dist.get_process_group_ranks(g.pp),
        "dp": dist.get_process_group_ranks(g.dp),
        "ranks": (g.tp_rank, g.pp_rank, g.dp_rank),
        "sizes": (g.tp_size, g.pp_size, g.dp_size),
    }


@pytest.mark.slow
def test_process_groups_tp2_pp2():
    res = run_distributed(_groups_worker, 4, timeout_s=120)
    # megatron order tp-cp-ep-dp-pp: TP neighbours are adjacent ranks, pipeline stages are world/pp apart.
    assert [r["tp"] for r in res] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["pp"] for r in res] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["dp"] for r in res] == [[0], [1], [2], [3]]
    assert [r["ranks"] for r in res] == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)]
    assert all(r["sizes"] == (2, 2, 1) for r in res)
