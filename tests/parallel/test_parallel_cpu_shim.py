"""The CPU shim megatron-core needs without CUDA: applied only without CUDA, idempotent, reversible, and enough for
the RNG tracker, activation checkpointing and a 2-stage 1F1B pipeline over gloo."""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("megatron.core")

from support.harness import run_distributed  # noqa: E402

from hs_scale.parallel import cpu_shim  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is a no-op on CUDA machines")


@pytest.fixture
def shim():
    """Apply the shim for one test and leave megatron as it was (other tests share this process)."""
    was_applied = cpu_shim.is_cpu_shim_applied()
    assert cpu_shim.apply_cpu_shim()
    yield
    if not was_applied:
        cpu_shim.remove_cpu_shim()


def test_not_applied_when_cuda_is_available(monkeypatch):
    if cpu_shim.is_cpu_shim_applied():
        cpu_shim.remove_cpu_shim()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    schedules = importlib.import_module("megatron.core.pipeline_parallel.schedules")
    assert cpu_shim.apply_cpu_shim() is False
    assert not cpu_shim.is_cpu_shim_applied()
    assert schedules.torch is torch


def test_idempotent_and_reversible():
    p2p = importlib.import_module("megatron.core.pipeline_parallel.p2p_communication")
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    fork = random.CudaRNGStatesTracker.fork
    assert cpu_shim.apply_cpu_shim() and cpu_shim.apply_cpu_shim()
    proxy = p2p.torch
    assert proxy is not torch
    assert cpu_shim.apply_cpu_shim() and p2p.torch is proxy  # a third call changes nothing
    cpu_shim.remove_cpu_shim()
    assert p2p.torch is torch and random.CudaRNGStatesTracker.fork is fork and random.torch is torch
    assert not cpu_shim.is_cpu_shim_applied()


def test_device_redirects_are_local_to_megatron(shim):
    schedules = importlib.import_module("megatron.core.pipeline_parallel.schedules")
    p2p = importlib.import_module("megatron.core.pipeline_parallel.p2p_communication")
    buffers = importlib.import_module("megatron.core.distributed.param_and_grad_buffer")
    assert schedules.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
    assert schedules.torch.empty(3, device=torch.device("cuda", 0)).device.type == "cpu"
    assert p2p.torch.cuda.current_device() == "cpu"
    assert buffers.torch.cuda.current_device() == "cpu"
    p2p.torch.cuda.synchronize()  # a no-op instead of "Torch not compiled with CUDA"
    assert p2p.torch.Tensor is torch.Tensor and p2p.torch.distributed is torch.distributed
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()  # the real torch.cuda is untouched


def test_rng_tracker_uses_cpu_generator(shim):
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before), "fork must restore the default stream"
    with tracker.fork():
        b = torch.rand(4)
    assert not torch.equal(a, b), "the tracked stream must advance across forks"
    tensor_parallel.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(4), a), "same seed, same tracked stream"
    tensor_parallel.model_parallel_cuda_manual_seed(123, tp_rank=1, ep_rank=0, etp_rank=0)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        assert not torch.equal(torch.rand(4), a), "another TP rank gets another stream"


def test_activation_checkpoint_replays_dropout(shim):
    """megatron's checkpoint saves/restores the device RNG state around recomputation: on CPU via the shim."""
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0)
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)

    def block(inp):
        return torch.nn.functional.dropout(lin(inp), p=0.5, training=True)

    torch.manual_seed(0)
    plain = block(x)
    plain.sum().backward()
    grads = x.grad.clone(), lin.weight.grad.clone()
    x.grad = None
    lin.weight.grad = None
    torch.manual_seed(0)
    ckpt = tensor_parallel.checkpoint(block, False, x)
    ckpt.sum().backward()
    torch.testing.assert_close(ckpt, plain)
    torch.testing.assert_close((x.grad, lin.weight.grad), grads)


# --- 2-stage pipeline over gloo: p2p buffers on current_device(), the schedule's device="cuda" counter ----------


def _pipeline_worker(rank: int, world_size: int) -> dict:
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer import TransformerConfig

    from hs_scale.parallel.layout import ParallelConfig, init_parallel_groups

    groups = init_parallel_groups(ParallelConfig(pipeline_parallel=2), seed=0)
    torch.manual_seed(0)
    full = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6), torch.nn.Tanh())
    data = [torch.randn(3, 2, 6) for _ in range(4)]  # 4 micro-batches of [T, B, D] (megatron's layout)
    stage = full[:2] if groups.pp_rank == 0 else full[2:]

    class Stage(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.input = stage, None

        def set_input_tensor(self, t):
            self.input = t[0] if isinstance(t, list) else t

        def forward(self, x):
            return self.body(x if groups.pp_rank == 0 else self.input)

    model = Stage()
    # variable_seq_lengths: stages exchange shapes first (p2p buffers on torch.cuda.current_device()).
    model.config = TransformerConfig(
        num_layers=2,
        hidden_size=6,
        num_attention_heads=1,
        pipeline_model_parallel_size=2,
        pipeline_dtype=torch.float32,
        variable_seq_lengths=True,
        use_cpu_initialization=True,
        moe_token_dispatcher_type="alltoall",  # megatron refuses variable lengths with its MoE default
    )
    model.model_type = ModelType.encoder_or_decoder
    it = iter(data)

    def step(_, m):
        out = m(next(it))
        return out, lambda o: (o.square().sum(), {"loss": o.square().sum().detach()})

    losses = get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=it,
        model=model,
        num_microbatches=4,
        seq_length=3,
        micro_batch_size=2,
        forward_only=False,
    )
    ref = sum(full(x).square().sum() for x in data)  # the whole model in this process
    # megatron divides each micro-batch loss by num_microbatches before backward (a mean over micro-batches)
    ref_grads = torch.autograd.grad(ref / 4, list(stage.parameters()))
    err = max((p.grad - g).abs().max().item() for p, g in zip(stage.parameters(), ref_grads, strict=True))
    total = sum(d["loss"].item() for d in losses) if losses else None
    return {"grad_err": err, "loss": total, "ref": ref.item()}


@pytest.mark.slow
def test_pipeline_1f1b_on_gloo_matches_single_process():
    res = run_distributed(_pipeline_worker, 2, timeout_s=120)
    assert res[0]["grad_err"] < 1e-5 and res[1]["grad_err"] < 1e-5, res
    assert res[1]["loss"] == pytest.approx(res[1]["ref"], rel=1e-5)
