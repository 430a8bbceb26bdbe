"""megatron-core glue for tensor- and pipeline-parallel training, model-agnostic: the step engine
(hs_scale.training.engine) is the one caller.

    chunks = parallelize_model(model, parallel_cfg, groups, label_smoothing=0.1)   # this rank's model chunks
    reports = run_pipeline_schedule(wrapped, chunks, microbatches, forward_step, forward_only=False)
    sync_shared_embedding(chunks, groups)                                         # after the gradient sync
    norm = clip_grad_norm(chunks, groups, clip_norm=10.0)

`microbatches`: this data-parallel rank's micro-batches for one optimizer step, each with the fields of
hs_scale.data.Batch (features + feature_lengths or source_tokens; decoder_input, target, src_task, tgt_task),
already on the device. Every rank of a pipeline (and of a TP group) gets the same ones.

Collectives per step beyond the model's own (TP all-reduces, pipeline p2p): one embedding-gradient all-reduce
over pp when the (tied) embedding table lives on several stages, and a grad-norm all-reduce over tp x pp.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from hs_scale.parallel.layout import ParallelConfig, ParallelGroups
from hs_scale.parallel.pipeline import ModelChunk, PipelineChunk


def _chunk_class(model_cfg) -> type[ModelChunk]:
    """The pipeline chunk of a model family: the LM's (lm_pipeline.py) or the encoder-decoders'."""
    if model_cfg.arch == "lm":
        from hs_scale.parallel.lm_pipeline import LMPipelineChunk

        return LMPipelineChunk
    return PipelineChunk


def megatron_config(model_cfg, parallel_cfg: ParallelConfig):
    """The megatron TransformerConfig its schedules and DDP read (p2p dtype, variable lengths, loss scaling)."""
    from megatron.core.transformer import TransformerConfig

    vp = parallel_cfg.virtual_pipeline if (parallel_cfg.virtual_pipeline or 1) > 1 else None
    dtype = torch.bfloat16 if parallel_cfg.bf16 else torch.float32
    lm = model_cfg.arch == "lm"
    return TransformerConfig(
        num_layers=model_cfg.num_layers if lm else model_cfg.encoder_layers + model_cfg.decoder_layers,
        hidden_size=model_cfg.hidden_size if lm else model_cfg.d_model,
        num_attention_heads=model_cfg.num_heads,
        tensor_model_parallel_size=parallel_cfg.tensor_parallel,
        pipeline_model_parallel_size=parallel_cfg.pipeline_parallel,
        virtual_pipeline_model_parallel_size=vp,
        pipeline_dtype=dtype,
        bf16=parallel_cfg.bf16,
        use_cpu_initialization=True,
        # Encoder length S and target length L differ per batch: megatron sends each p2p tensor's shape first.
        # NOTE: megatron 0.16's interleaved schedule deadlocks with variable_seq_lengths (its combined
        # send/recv calls exchange shapes in a different order on neighbouring ranks: measured hang on gloo), so
        # interleaved pipelines pad every p2p tensor to the step's largest shape instead (`p2p_shape`).
        variable_seq_lengths=vp is None,
        batch_p2p_comm=parallel_cfg.resolved_batch_p2p_comm(dist.get_backend()),
        # Our loss_func already divides by the global token count; megatron must not divide again.
        calculate_per_token_loss=True,
        moe_token_dispatcher_type="alltoall",  # unused (no MoE); the default refuses variable_seq_lengths
    )


def parallelize_model(model: nn.Module, parallel_cfg: ParallelConfig, groups: ParallelGroups, label_smoothing=0.0):
    """This rank's model chunks (vp of them) cut from a built single-device model (consumed: do not reuse it).

    The layout is validated once, where the config is loaded (hs_scale.config: `validate_layout`); direct users of
    this API call validate_layout themselves.
    """
    from hs_scale.parallel.tp_model import parallelize_tensor

    cfg = model.config
    parallelize_tensor(model, groups)
    tconfig = megatron_config(cfg, parallel_cfg)
    vp = parallel_cfg.virtual_pipeline or 1
    chunk_class = _chunk_class(cfg)
    chunks = []
    for v in range(vp):
        chunk = chunk_class(
            model, v * groups.pp_size + groups.pp_rank, vp * groups.pp_size, groups, tconfig, v if vp > 1 else None
        )
        chunk.label_smoothing = label_smoothing
        chunks.append(chunk)
    return chunks


def run_pipeline_schedule(wrapped: list, modules: list[ModelChunk], microbatches: list, forward_step: Callable,
                          forward_only: bool) -> list:
    """Every micro-batch through megatron-core's schedule for this layout (1F1B, interleaved); the reports the
    last stage's loss functions returned, in micro-batch order (empty on other stages).

    forward_step(batch, model) -> (output, loss_func): megatron's forward_step_func with the batch already drawn
    (loss_func(output) -> (loss to backpropagate, token count, report); megatron calls it on the last stage).
    wrapped: the chunks as megatron DDP wrapped them (plain chunks for forward-only use).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    shape = (1, 1)  # ignored with variable_seq_lengths
    if not modules[0].config.variable_seq_lengths:
        extents = [modules[0].p2p_extent(mb) for mb in microbatches]
        shape = (max(b for b, _ in extents), max(n for _, n in extents))
        for m in modules:
            m.p2p_shape = shape
    iters = [iter(microbatches) for _ in wrapped]
    config, M = modules[0].config, len(microbatches)
    group = config.microbatch_group_size_per_vp_stage
    if forward_only and len(wrapped) > 1 and M % group:
        # megatron's interleaved schedule refuses a last micro-batch group smaller than pp, and an evaluation has
        # whatever number of batches its set gives (training's is a multiple of pp: validate_layout). Forward
        # only, one group of all M micro-batches (each chunk runs them all, then the next) is as valid an order.
        config.microbatch_group_size_per_vp_stage = M
    try:
        return get_forward_backward_func()(
            forward_step_func=lambda data_iterator, model: forward_step(next(data_iterator), model),
            data_iterator=iters if len(iters) > 1 else iters[0],
            model=wrapped if len(wrapped) > 1 else wrapped[0],
            num_microbatches=M,
            # megatron's (seq, batch, hidden) p2p shape; our tensors are [B, N, D], the names do not matter.
            seq_length=shape[0],
            micro_batch_size=shape[1],
            forward_only=forward_only,
        )
    finally:
        config.microbatch_group_size_per_vp_stage = group


def sync_shared_embedding(modules: list[ModelChunk], groups: ParallelGroups) -> None:
    """Sum the gradient (main_grad) of the embedding copies held by several chunks (tied head / text encoder)."""
    held = modules[0].embedding_chunks
    if len(held) < 2:
        return
    grads = [m.token_embedding.weight.main_grad for m in modules if m.chunk in held]
    total = torch.zeros_like(grads[0]) if grads else torch.zeros(modules[0].embedding_shape)
    for g in grads:
        total += g
    if len({c % groups.pp_size for c in held}) > 1:
        dist.all_reduce(total, group=groups.pp)
    for g in grads:
        g.copy_(total)


def clip_grad_norm(modules: list[nn.Module], groups: ParallelGroups | None, clip_norm: float) -> float:
    """Global gradient norm over tp x pp, clipped in place to `clip_norm` (0: not clipped); every layout.

    Each TP shard and each replicated tensor is counted once (replicated ones on TP rank 0), the embedding copies
    of several pipeline chunks once (on the first chunk holding one). A replicated model is the case tp = pp = 1.
    """
    owner = None
    if isinstance(modules[0], ModelChunk):
        owner = min(modules[0].embedding_chunks)
    tp_rank = 0 if groups is None else groups.tp_rank
    grads, counted = [], []
    for m in modules:
        for p in m.parameters():
            if p.grad is None:
                continue
            grads.append(p.grad)
            if getattr(p, "shared_embedding", False) and m.chunk != owner:
                continue
            if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
                counted.append(p.grad)
    sq = torch.zeros(1, device=grads[0].device if grads else "cpu")
    for g in counted:
        sq += g.float().pow(2).sum()
    if groups is not None and groups.tp_size * groups.pp_size > 1:
        from megatron.core import parallel_state

        dist.all_reduce(sq, group=parallel_state.get_model_parallel_group())
    norm = math.sqrt(sq.item())
    if clip_norm > 0 and norm > clip_norm:
        for g in grads:
            g.mul_(clip_norm / (norm + 1e-6))
    return norm
