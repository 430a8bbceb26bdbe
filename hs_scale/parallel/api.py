"""The one entry the trainer calls for TP x PP x DP training (megatron-core schedules; megatron DDP or DeepSpeed).

    groups = init_parallel_groups(parallel_cfg, seed=seed)               # after torch.distributed is up
    torch.manual_seed(seed)                                              # same model init on every rank
    chunks = build_parallel_model(model_cfg, selection_cfg, num_tasks, parallel_cfg, groups, label_smoothing=0.1)
    engine = build_parallel_engine(chunks, parallel_cfg, groups, lr=5e-4)
    stats = parallel_train_step(engine, microbatches, clip_norm=10.0, temperature=tau)   # one optimizer step
    evals = forward_eval_loss(engine, eval_microbatches)

`microbatches`: this data-parallel rank's micro-batches for one optimizer step (`num_microbatches` of them), each
with the fields of hs_scale.data.Batch (features + feature_lengths or source_tokens; decoder_input, target,
src_task, tgt_task), already on the device. Every rank of a pipeline (and of a TP group) gets the same ones.

Loss: token-mean label-smoothed CE over the non-pad targets of the *global* batch (all micro-batches of all dp
ranks): each micro-batch backpropagates loss_sum / global_tokens, the dp gradient reduction sums.
Collectives per step beyond the model's own (TP all-reduces, pipeline p2p): one all-reduce of the token count
over dp, the gradient reduction over dp, one embedding-gradient all-reduce over pp when the (tied) embedding
table lives on several stages, a grad-norm all-reduce over tp x pp when clipping, and two small all-reduces of
the reported sums (pp, dp).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from hs_scale.parallel.data_parallel import wrap_deepspeed, wrap_megatron_ddp
from hs_scale.parallel.layout import ParallelConfig, ParallelGroups, padded_vocab_size, validate_layout
from hs_scale.parallel.pipeline import PipelineChunk, embedding_chunks


def megatron_config(model_cfg, parallel_cfg: ParallelConfig):
    """The megatron TransformerConfig its schedules and DDP read (p2p dtype, variable lengths, loss scaling)."""
    from megatron.core.transformer import TransformerConfig

    vp = parallel_cfg.virtual_pipeline if (parallel_cfg.virtual_pipeline or 1) > 1 else None
    dtype = torch.bfloat16 if parallel_cfg.bf16 else torch.float32
    return TransformerConfig(
        num_layers=model_cfg.encoder_layers + model_cfg.decoder_layers,
        hidden_size=model_cfg.d_model,
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
    """This rank's model chunks (vp of them) cut from a built single-device model (consumed: do not reuse it)."""
    from hs_scale.parallel.tp_model import parallelize_tensor

    cfg, sel = model.config, model.selection_config
    if sel.enabled and sel.kl_weight > 0:
        raise ValueError(
            "selection.kl_weight > 0 is not supported by the parallel trainer yet (the KL of a stage's selectors "
            "would need an auxiliary-loss hook); set selection.kl_weight=0"
        )
    validate_layout(
        parallel_cfg,
        world_size=dist.get_world_size(),
        num_heads=cfg.num_heads,
        pool_heads=sel.pool_heads if sel.enabled else cfg.num_heads,
        encoder_layers=cfg.encoder_layers,
        decoder_layers=cfg.decoder_layers,
        ffn_dim=cfg.ffn_dim,
        vocab_size=padded_vocab_size(cfg.vocab_size, parallel_cfg.tensor_parallel),
        strategy=sel.strategy,
    )
    parallelize_tensor(model, groups)
    tconfig = megatron_config(cfg, parallel_cfg)
    vp = parallel_cfg.virtual_pipeline or 1
    chunks = []
    for v in range(vp):
        chunk = PipelineChunk(
            model, v * groups.pp_size + groups.pp_rank, vp * groups.pp_size, groups, tconfig, v if vp > 1 else None
        )
        chunk.label_smoothing = label_smoothing
        chunks.append(chunk)
    return chunks


def build_parallel_model(
    model_cfg, selection_cfg, num_tasks: int, parallel_cfg: ParallelConfig, groups: ParallelGroups, **kwargs
) -> list[PipelineChunk]:
    """Build the single-device model (seed torch identically on every rank first) and cut this rank's chunks."""
    from hs_scale.models import build_model

    return parallelize_model(build_model(model_cfg, selection_cfg, num_tasks), parallel_cfg, groups, **kwargs)


# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ParallelEngine:
    """Wrapped chunks (megatron DDP, or one DeepSpeed engine), the optimizer, and what a step needs."""

    chunks: list
    optimizer: object
    cfg: ParallelConfig
    groups: ParallelGroups
    kind: str
    params: list = field(default_factory=list)

    @property
    def modules(self) -> list[PipelineChunk]:
        return [c.module for c in self.chunks]


def build_parallel_engine(
    chunks: list[PipelineChunk], cfg: ParallelConfig, groups: ParallelGroups, *, lr: float, betas=(0.9, 0.98),
    eps: float = 1e-6, weight_decay: float = 0.0
) -> ParallelEngine:
    """megatron DDP around every chunk + torch AdamW on main_grad, or (pp == 1) a DeepSpeed ZeRO engine."""
    optim = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    params = [p for c in chunks for p in c.parameters() if p.requires_grad]
    if cfg.engine == "deepspeed":
        from megatron.core import parallel_state

        (chunk,) = chunks  # validate_layout refused pp > 1 with deepspeed
        # gradient_accumulation_steps: _run_schedule calls step() after every micro-batch.
        model = wrap_deepspeed(chunk, torch.optim.AdamW(params, **optim), cfg, grad_accum=cfg.num_microbatches,
                               mpu=parallel_state)
        return ParallelEngine([model], model.optimizer, cfg, groups, "deepspeed", params)
    # Bucketing only pays with overlap; later chunks of an interleaved pipeline skip it (as megatron does).
    wrapped = [wrap_megatron_ddp(chunk, cfg, chunk.config, disable_bucketing=i > 0) for i, chunk in enumerate(chunks)]
    return ParallelEngine(wrapped, torch.optim.AdamW(params, **optim), cfg, groups, "megatron_ddp", params)


# ---------------------------------------------------------------------------------------------------------------


def _forward_step(norm: float, data_iterator, model):
    """megatron forward_step_func: last chunk returns (loss, loss_func); others their p2p tensor."""
    out = model(next(data_iterator))
    if not isinstance(out, dict):
        return out, None

    def loss_func(loss_sum):
        report = {k: v.detach().float() for k, v in out.items()}
        return loss_sum / norm, out["tokens"].int(), report

    return out["loss_sum"], loss_func


def _run_schedule(engine: ParallelEngine, microbatches: list, norm: float, forward_only: bool) -> torch.Tensor:
    """Runs every micro-batch through the pipeline; returns [loss_sum, nll_sum, ctc_sum] of this dp rank (every pp
    rank). loss_sum is the training objective (CE, or the CE/CTC mix with a CTC head); ctc_sum is 0 without one."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    iters = [iter(microbatches) for _ in engine.chunks]
    shape = (1, 1)  # ignored with variable_seq_lengths
    if not engine.modules[0].config.variable_seq_lengths:
        from hs_scale.parallel.pipeline import source_length

        cfg = engine.modules[0].model_config
        shape = (
            max(mb.decoder_input.shape[0] for mb in microbatches),
            max(source_length(cfg, mb) + mb.decoder_input.shape[1] for mb in microbatches),
        )
        for m in engine.modules:
            m.p2p_shape = shape
    if engine.kind == "deepspeed":
        store, (model,) = [], engine.chunks
        for mb in microbatches:
            out = model(mb)
            if not forward_only:
                # DeepSpeed averages over dp and divides by the accumulation steps: undo both.
                model.backward(out["loss_sum"] * (engine.groups.dp_size * len(microbatches) / norm))
                model.step()
            store.append({k: v.detach().float() for k, v in out.items()})
    else:
        store = get_forward_backward_func()(
            forward_step_func=functools.partial(_forward_step, norm),
            data_iterator=iters if len(iters) > 1 else iters[0],
            model=engine.chunks if len(engine.chunks) > 1 else engine.chunks[0],
            num_microbatches=len(microbatches),
            # megatron's (seq, batch, hidden) p2p shape; our tensors are [B, N, D], the names do not matter.
            seq_length=shape[0],
            micro_batch_size=shape[1],
            forward_only=forward_only,
        )
    sums = torch.zeros(3)
    for item in store:
        sums += torch.stack([item["loss_sum"].cpu(), item["nll_sum"].cpu(), item.get("ctc_sum", torch.zeros(())).cpu()])
    if engine.groups.pp_size > 1:  # only the last stage computed the loss
        dist.all_reduce(sums, group=engine.groups.pp)
    return sums


def _global_tokens(microbatches: list, pad_id: int, groups: ParallelGroups) -> float:
    tokens = torch.tensor([float(sum(int(mb.target.ne(pad_id).sum()) for mb in microbatches))])
    if groups.dp_size > 1:
        dist.all_reduce(tokens, group=groups.dp)
    return tokens.item()


def _sync_shared_embedding(engine: ParallelEngine) -> None:
    """Sum the gradient of the embedding copies held by several chunks (tied head / text encoder) over pp."""
    mods = engine.modules
    cfg = mods[0].model_config
    held = embedding_chunks(cfg.arch, cfg.tie_embeddings, cfg.encoder_layers, cfg.decoder_layers, mods[0].num_chunks)
    if len(held) < 2:
        return
    mine = [m.decoder.embed_tokens.weight for m in mods if m.chunk in held]
    grads = [p.main_grad for p in mine]
    total = torch.zeros_like(grads[0]) if grads else None
    if total is None:
        Vl = padded_vocab_size(cfg.vocab_size, engine.groups.tp_size) // engine.groups.tp_size
        total = torch.zeros(Vl, cfg.d_model)
    for g in grads:
        total += g
    if len({c % engine.groups.pp_size for c in held}) > 1:
        dist.all_reduce(total, group=engine.groups.pp)
    for g in grads:
        g.copy_(total)


def forward_backward(engine: ParallelEngine, microbatches: list, temperature: float | None = None) -> dict:
    """Gradients of one step in every parameter's `.grad` (reduced over dp, summed over embedding copies)."""
    mods = engine.modules
    pad_id = mods[0].model_config.pad_token_id
    for m in mods:
        m.train()
        if temperature is not None:
            m.set_selection_temperature(temperature)
    tokens = _global_tokens(microbatches, pad_id, engine.groups)
    if engine.kind == "megatron_ddp":
        for c in engine.chunks:
            c.zero_grad_buffer()
    sums = _run_schedule(engine, microbatches, tokens, forward_only=False)
    if engine.kind == "megatron_ddp":
        for c in engine.chunks:
            c.finish_grad_sync()
        _sync_shared_embedding(engine)
        for p in engine.params:
            p.grad = p.main_grad.to(p.dtype) if p.main_grad.dtype != p.dtype else p.main_grad
    if engine.groups.dp_size > 1:
        dist.all_reduce(sums, group=engine.groups.dp)
    return {"loss": sums[0].item() / tokens, "nll": sums[1].item() / tokens, "ctc": sums[2].item() / tokens,
            "tokens": tokens}


def clip_grad_norm(engine: ParallelEngine, clip_norm: float) -> float:
    """Global grad norm over tp x pp (each shard and each replicated tensor counted once), clipped in place."""
    from megatron.core import parallel_state

    mods, sq = engine.modules, torch.zeros(1)
    cfg = mods[0].model_config
    held = embedding_chunks(cfg.arch, cfg.tie_embeddings, cfg.encoder_layers, cfg.decoder_layers, mods[0].num_chunks)
    owner = min(held)
    for m in mods:
        for p in m.parameters():
            if p.grad is None:
                continue
            if getattr(p, "shared_embedding", False) and m.chunk != owner:
                continue
            if getattr(p, "tensor_model_parallel", False) or engine.groups.tp_rank == 0:
                sq += p.grad.float().pow(2).sum()
    if engine.groups.tp_size * engine.groups.pp_size > 1:
        dist.all_reduce(sq, group=parallel_state.get_model_parallel_group())
    norm = math.sqrt(sq.item())
    if clip_norm > 0 and norm > clip_norm:
        for p in engine.params:
            if p.grad is not None:
                p.grad.mul_(clip_norm / (norm + 1e-6))
    return norm


def parallel_train_step(
    engine: ParallelEngine, microbatches: list, *, clip_norm: float = 0.0, temperature: float | None = None
) -> dict:
    """One optimizer step over `microbatches`; returns {"loss", "nll", "tokens", "grad_norm"} (global, token-mean).

    clip_norm 0 disables clipping (the norm is still reported for megatron_ddp; not computed for DeepSpeed).
    """
    stats = forward_backward(engine, microbatches, temperature)
    if engine.kind == "megatron_ddp":
        stats["grad_norm"] = clip_grad_norm(engine, clip_norm)
        engine.optimizer.step()
        engine.optimizer.zero_grad(set_to_none=True)
    return stats


@torch.no_grad()
def forward_eval_loss(engine: ParallelEngine, microbatches: list) -> dict:
    """Teacher-forced {"loss", "nll", "tokens"} over `microbatches` with deterministic head selection."""
    for m in engine.modules:
        m.eval()
    tokens = _global_tokens(microbatches, engine.modules[0].model_config.pad_token_id, engine.groups)
    sums = _run_schedule(engine, microbatches, tokens, forward_only=True)
    if engine.groups.dp_size > 1:
        dist.all_reduce(sums, group=engine.groups.dp)
    return {"loss": sums[0].item() / tokens, "nll": sums[1].item() / tokens, "tokens": tokens}
