"""Parallel layout: the config, its validation, and the megatron-core process groups it creates.

A layout is tp x pp x dp ranks (megatron order "tp-cp-ep-dp-pp": tensor-parallel ranks are adjacent).
The checks are plain functions of numbers, so the top-level config can refuse a bad layout when it is loaded,
long before a reshape fails deep inside a layer. Every refusal says what to change.

Head selection under TP (see docs/method.md): the pool of H' heads is cut into t contiguous partitions; TP rank
k owns groups k*H/t .. (k+1)*H/t - 1, their H'/t pool heads and their slice of the selector logits phi, and
computes exactly H/t heads. Hence H and H' must both be multiples of t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hs_scale.selection.config import head_problems as check_heads  # the one head rule

ENGINES = ("megatron_ddp", "deepspeed")


class LayoutError(ValueError):
    """A parallel layout that cannot work; the message lists every problem and the change that fixes it."""


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    """t, ranks that split each attention/FFN layer. Must divide H, H' and (after padding) the vocabulary."""

    pipeline_parallel: int = 1
    """Pipeline stages. Encoder then decoder layers are cut into pipeline_parallel * virtual_pipeline equal chunks."""

    data_parallel: int | None = None
    """Data-parallel replicas; None derives world_size // (tensor_parallel * pipeline_parallel)."""

    virtual_pipeline: int | None = None
    """Model chunks per pipeline stage (interleaved 1F1B); None or 1 is plain 1F1B."""

    engine: str = "megatron_ddp"
    """Data-parallel engine: "megatron_ddp" (megatron-core DDP, distributed optimizer where CUDA allows) or
    "deepspeed" (DeepSpeed engine with ZeRO stage `zero_stage`)."""

    zero_stage: int = 0
    """DeepSpeed ZeRO stage, 0, 1 or 2 (engine="deepspeed" only; megatron's equivalent is distributed_optimizer)."""

    distributed_optimizer: bool = False
    """megatron-core distributed optimizer (optimizer state sharded over dp). Needs CUDA."""

    bf16: bool = False
    """bf16 parameters/activations with fp32 main grads (megatron) or DeepSpeed bf16 (ZeRO 2 on CPU)."""

    grad_reduce_in_fp32: bool = True
    """Keep megatron DDP's gradient buffer in fp32 even with bf16 parameters."""

    overlap_grad_reduce: bool = False
    """Overlap megatron DDP's gradient all-reduce with backward (needs CUDA streams; off on CPU)."""

    sequence_parallel: bool = False
    """Megatron sequence parallelism in TP regions. Needs apex or Transformer Engine LayerNorm: refused on CPU."""

    batch_p2p_comm: bool | None = None
    """Batch pipeline send/recv ops. None: False on gloo (interleaved pipelines are silently wrong with True
    there, see docs/stack.md) and True otherwise."""

    timeout_minutes: int = 30
    """Collective timeout of every process group."""

    def resolved_batch_p2p_comm(self, backend: str) -> bool:
        if self.batch_p2p_comm is not None:
            return self.batch_p2p_comm
        return backend != "gloo"

    @property
    def model_parallel(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel


# ---------------------------------------------------------------------------------------------------------------
# Checks: plain functions of numbers. Each returns a list of problems (empty = fine); `validate_layout` raises.


def check_world(world_size: int, tp: int, pp: int, dp: int | None = None) -> list[str]:
    problems = [f"{name}={v} must be >= 1" for name, v in (("tensor_parallel", tp), ("pipeline_parallel", pp)) if v < 1]
    if problems:
        return problems
    if world_size % (tp * pp):
        fits = [d for d in range(1, world_size + 1) if world_size % d == 0]
        problems.append(
            f"world size {world_size} is not a multiple of tensor_parallel*pipeline_parallel = {tp}*{pp} = {tp * pp}; "
            f"launch a multiple of {tp * pp} ranks, or choose tensor_parallel*pipeline_parallel in {fits}"
        )
    elif dp is not None and tp * pp * dp != world_size:
        problems.append(
            f"tensor_parallel*pipeline_parallel*data_parallel = {tp}*{pp}*{dp} = {tp * pp * dp} != world size "
            f"{world_size}; set data_parallel={world_size // (tp * pp)} or leave it unset to derive it"
        )
    return problems


def check_ffn(ffn_dim: int, tp: int) -> list[str]:
    if ffn_dim % tp:
        return [
            f"model.ffn_dim={ffn_dim} is not divisible by tensor_parallel={tp}; use ffn_dim="
            f"{math.ceil(ffn_dim / tp) * tp} or a tensor_parallel that divides {ffn_dim}"
        ]
    return []


def check_pipeline(
    encoder_layers: int, decoder_layers: int, pp: int, virtual: int | None = None, num_microbatches: int = 1
) -> list[str]:
    """Encoder then decoder layers, concatenated, are cut into pp * virtual equal chunks."""
    chunks = pp * (virtual or 1)
    total = encoder_layers + decoder_layers
    problems = []
    if virtual is not None and virtual < 1:
        problems.append(f"virtual_pipeline={virtual} must be >= 1 (or unset)")
        return problems
    if total % chunks:
        ok = [c for c in range(1, total + 1) if total % c == 0]
        problems.append(
            f"{encoder_layers} encoder + {decoder_layers} decoder = {total} layers cannot be split into "
            f"pipeline_parallel*virtual_pipeline = {chunks} equal chunks; pick pp*vp in {ok}, or change the "
            f"layer counts to a multiple of {chunks}"
        )
    if virtual and virtual > 1 and (num_microbatches < pp or num_microbatches % pp):
        problems.append(
            f"interleaved pipeline (virtual_pipeline={virtual}) needs the micro-batches per step (train.grad_accum) "
            f"to be a multiple of pipeline_parallel={pp} (got {num_microbatches}); "
            f"set train.grad_accum={max(pp, num_microbatches // pp * pp)}"
        )
    return problems


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 1) -> int:
    """Smallest size >= vocab_size divisible by divisible_by * tp (vocab-parallel embedding rows per rank)."""
    multiple = divisible_by * tp
    return math.ceil(vocab_size / multiple) * multiple


def check_vocab(vocab_size: int, tp: int) -> list[str]:
    """The (already padded) vocabulary the embedding is built with must split evenly over TP ranks."""
    if vocab_size % tp:
        return [
            f"vocabulary size {vocab_size} is not divisible by tensor_parallel={tp}; pad it to "
            f"{padded_vocab_size(vocab_size, tp)} with padded_vocab_size() (extra rows are never targets)"
        ]
    return []


def check_engine(cfg: ParallelConfig, cuda: bool | None = None) -> list[str]:
    cuda = torch.cuda.is_available() if cuda is None else cuda
    problems = []
    if cfg.engine not in ENGINES:
        return [f"engine={cfg.engine!r} is unknown; use one of {ENGINES}"]
    if cfg.engine == "megatron_ddp" and cfg.zero_stage:
        problems.append(
            f"zero_stage={cfg.zero_stage} is a DeepSpeed option; set engine=deepspeed, or keep "
            "megatron_ddp with zero_stage=0 and distributed_optimizer=true for sharded optimizer state"
        )
    if cfg.engine == "deepspeed":
        if cfg.zero_stage not in (0, 1, 2):
            problems.append(
                f"zero_stage={cfg.zero_stage} is not supported; use 0, 1 or 2 (stage 3 would shard the "
                "TP/PP-partitioned weights a second time)"
            )
        if cfg.pipeline_parallel > 1:
            problems.append(
                "engine=deepspeed runs without pipeline parallelism here (its ZeRO-2 gradient hooks do not compose "
                "with megatron's pipeline schedule); set pipeline_parallel=1 or engine=megatron_ddp"
            )
        if cfg.distributed_optimizer:
            problems.append("distributed_optimizer is a megatron_ddp option; with engine=deepspeed use zero_stage=1/2")
        if cfg.bf16 and not cuda and cfg.zero_stage < 2:
            problems.append(
                f"DeepSpeed bf16 on CPU works with ZeRO 2 only (zero_stage={cfg.zero_stage}); set "
                "zero_stage=2 or bf16=false"
            )
    if cfg.distributed_optimizer and not cuda:
        problems.append(
            "distributed_optimizer needs CUDA (megatron's optimizer allocates on the GPU); on CPU set "
            "distributed_optimizer=false (megatron DDP + torch AdamW) or engine=deepspeed zero_stage=2"
        )
    if cfg.sequence_parallel and (cfg.tensor_parallel == 1 or not cuda):
        problems.append(
            "sequence_parallel needs tensor_parallel > 1 and apex/Transformer Engine LayerNorm (GPU); "
            "set sequence_parallel=false"
        )
    if cfg.overlap_grad_reduce and not cuda:
        problems.append("overlap_grad_reduce needs CUDA streams; set overlap_grad_reduce=false on CPU")
    return problems


def validate_layout(
    cfg: ParallelConfig,
    *,
    world_size: int,
    num_heads: int,
    pool_heads: int,
    encoder_layers: int,
    decoder_layers: int,
    ffn_dim: int | None = None,
    vocab_size: int | None = None,
    strategy: str = "group",
    cuda: bool | None = None,
    num_microbatches: int = 1,
) -> int:
    """Raise LayoutError listing every problem; return the data-parallel size.

    vocab_size is the size the embedding is built with (pad it first with `padded_vocab_size`).
    num_microbatches: micro-batches per optimizer step (train.grad_accum), which an interleaved pipeline needs to be
    a multiple of pipeline_parallel.
    """
    tp, pp = cfg.tensor_parallel, cfg.pipeline_parallel
    problems = check_world(world_size, tp, pp, cfg.data_parallel)
    if not problems:
        problems += check_heads(num_heads, pool_heads, tp, strategy)
        problems += check_pipeline(encoder_layers, decoder_layers, pp, cfg.virtual_pipeline, num_microbatches)
        if ffn_dim is not None:
            problems += check_ffn(ffn_dim, tp)
        if vocab_size is not None:
            problems += check_vocab(vocab_size, tp)
    if num_microbatches < 1:
        problems.append(f"num_microbatches={num_microbatches} must be >= 1")
    problems += check_engine(cfg, cuda)
    if problems:
        raise LayoutError("invalid layout of heads, layers and ranks:\n  - " + "\n  - ".join(problems))
    return world_size // (tp * pp)


# ---------------------------------------------------------------------------------------------------------------
# Process groups


@dataclass
class ParallelGroups:
    """Where a rank stands and the groups it takes part in, passed explicitly to whatever communicates (the TP
    layers, the pipeline, the checkpoint manager); nothing reads megatron's global parallel state instead.

    tp: tensor-parallel group (attention/FFN/vocab shards); pp: pipeline stages; dp: data-parallel replicas.
    A group is None where no group was made (one process, or plain data parallelism: `data_parallel()`).
    rank / world: the global rank and world size.
    """

    tp: torch.distributed.ProcessGroup | None
    pp: torch.distributed.ProcessGroup | None
    dp: torch.distributed.ProcessGroup | None
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    rank: int = 0
    world: int = 1

    @classmethod
    def data_parallel(cls) -> ParallelGroups:
        """Plain data parallelism over the whole torch.distributed world; one process when it is not up."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return cls(None, None, None, 0, 1, 0, 1, 0, 1)
        rank, world = dist.get_rank(), dist.get_world_size()
        return cls(None, None, dist.group.WORLD, 0, 1, 0, 1, rank, world, rank, world)

    def layout(self) -> dict:
        """The sizes a checkpoint records: {"world", "tp", "pp", "dp"}."""
        return {"world": self.world, "tp": self.tp_size, "pp": self.pp_size, "dp": self.dp_size}


def init_parallel_groups(cfg: ParallelConfig, seed: int | None = None) -> ParallelGroups:
    """Create megatron-core's process groups for `cfg` on an initialised torch.distributed world.

    Applies the CPU shim when CUDA is absent. With `seed`, also seeds megatron's model-parallel RNG tracker
    (dropout inside TP regions differs per TP rank; everything else is seeded identically).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from hs_scale.parallel.cpu_shim import apply_cpu_shim

    apply_cpu_shim()
    world = dist.get_world_size()
    validate_world = check_world(world, cfg.tensor_parallel, cfg.pipeline_parallel, cfg.data_parallel)
    if validate_world:
        raise LayoutError("invalid parallel layout:\n  - " + "\n  - ".join(validate_world))
    vp = cfg.virtual_pipeline if cfg.virtual_pipeline and cfg.virtual_pipeline > 1 else None
    ps.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor_parallel,
        pipeline_model_parallel_size=cfg.pipeline_parallel,
        virtual_pipeline_model_parallel_size=vp,
        distributed_timeout_minutes=cfg.timeout_minutes,
        # Extra gloo groups only matter next to NCCL; on a gloo world they would duplicate every group.
        create_gloo_process_groups=dist.get_backend() != "gloo",
    )
    if seed is not None:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return current_groups()


def current_groups() -> ParallelGroups:
    """The ParallelGroups of megatron-core's already-initialised parallel state (read once, where they are made)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    return ParallelGroups(
        tp=ps.get_tensor_model_parallel_group(),
        pp=ps.get_pipeline_model_parallel_group(),
        dp=ps.get_data_parallel_group(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        rank=dist.get_rank(),
        world=dist.get_world_size(),
    )


def destroy_parallel_groups() -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
