"""The two data-parallel wrappers behind one config switch (`ParallelConfig.engine`): megatron-core DDP or
DeepSpeed ZeRO. The step engine (hs_scale.training.engine) wraps the model (or each pipeline chunk) with them.

megatron_ddp on CPU: megatron's own optimizer assumes CUDA, so a plain torch AdamW steps on `main_grad`
(megatron's fp32 grad buffer, reduced over dp) copied into `.grad` (docs/stack.md).
"""

from __future__ import annotations

import importlib

from torch import nn

from hs_scale.parallel.layout import ParallelConfig


def wrap_megatron_ddp(module: nn.Module, cfg: ParallelConfig, model_config=None, disable_bucketing=False) -> nn.Module:
    """megatron-core DistributedDataParallel around `module`, replicas broadcast from dp rank 0.

    model_config: the megatron TransformerConfig the module carries (pipeline chunks); plain modules get a stub,
    since DDP only reads a few switches from it. calculate_per_token_loss: gradients are *summed* over dp (the
    loss already divides by the global token count).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig

    if model_config is None:
        model_config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1,
                                         use_cpu_initialization=True, calculate_per_token_loss=True, bf16=cfg.bf16)
    dcfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=cfg.grad_reduce_in_fp32,
        overlap_grad_reduce=cfg.overlap_grad_reduce,
        use_distributed_optimizer=cfg.distributed_optimizer,
    )
    ddp = DistributedDataParallel(model_config, dcfg, module=module, disable_bucketing=disable_bucketing)
    ddp.broadcast_params()  # replicas start identical even if ranks were seeded differently
    return ddp


def deepspeed_config(parallel_cfg: ParallelConfig, *, clip_norm: float = 0.0) -> dict:
    """The ds_config of hs_scale's DeepSpeed engine: the single source of what DeepSpeed is told.

    Only what hs_scale's config decides: ZeRO stage, bf16, gradient clipping, and DeepSpeed's batch bookkeeping.
    The optimizer is a client torch AdamW and the LR schedule a torch LambdaLR on it (never a ds_config
    "optimizer"/"scheduler"); batches are token-budgeted by hs_scale.data, so the micro-batch size is nominal.
    gradient_accumulation_steps is 1: the step engine sums its micro-batches' losses before the one backward().
    hs_scale.launch.ds_config prints this and checks hand-written ds_config files against it.
    """
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(clip_norm),
        "zero_optimization": {"stage": parallel_cfg.zero_stage},
        "bf16": {"enabled": bool(parallel_cfg.bf16)},
        "steps_per_print": 10**9,
    }


def wrap_deepspeed(module: nn.Module, optimizer, cfg: ParallelConfig, *, clip_norm: float = 0.0,
                   mpu=None) -> nn.Module:
    """A DeepSpeed engine (ZeRO stage cfg.zero_stage) around `module` with a client torch optimizer.

    The ds_config is `deepspeed_config(cfg, clip_norm=...)`. mpu: megatron's parallel_state when
    tensor-parallel ranks hold different shards (gradients then reduce over the dp group only).
    NOTE: ZeRO 1/2 replaces the client optimizer's params with flat fp32 partitions (its param_groups dicts stay
    the same objects, so a scheduler built on it still drives the lr DeepSpeed applies); checkpoint it through
    hs_scale.training.zero_state.checkpoint_optimizer(engine), not through the client optimizer.
    """
    _skip_deepspeed_shm_build()
    import deepspeed

    ds_config = deepspeed_config(cfg, clip_norm=clip_norm)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config, mpu=mpu,
                                           dist_init_required=False)
    return engine


def _skip_deepspeed_shm_build() -> None:
    """DeepSpeed JIT-builds a shared-memory comm op (~40 s) on every first init; gloo does not need it.

    NOTE: the module object must come from importlib: `import deepspeed.comm.torch as m` binds torch itself.
    """
    module = importlib.import_module("deepspeed.comm.torch")
    module.build_shm_op = lambda: None
