"""Reference data-parallel engines of the DP tests: a bare step around hs_scale's megatron DDP / DeepSpeed wrappers
with a caller-given loss, and a hook to inspect the reduced gradients (the trainer uses hs_scale.training.engine).

    engine = build_engine(model, cfg, groups, lr=5e-4)
    loss = engine.step(lambda m: loss_sum(m, local_batch), num_tokens=local_target_tokens)

Loss semantics (both engines): `loss_fn` returns the *sum* of this rank's token losses; the engine all-reduces
the token count over the data-parallel group first and backpropagates loss_sum / global_tokens, so the update
equals the single-process token-mean over the whole global batch whatever the per-rank token counts are.
Collectives per step: 2 scalar all-reduces (token count, reported loss) plus the engine's gradient reduction
(megatron: one all-reduce per grad bucket; DeepSpeed ZeRO-2: its reduce(-scatter)s and the parameter all-gather).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from hs_scale.parallel.data_parallel import wrap_deepspeed, wrap_megatron_ddp
from hs_scale.parallel.layout import ParallelConfig, ParallelGroups


def adamw(params, lr: float, betas=(0.9, 0.98), eps: float = 1e-6, weight_decay: float = 0.0):
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


class MegatronDDPEngine:
    """megatron-core DistributedDataParallel + torch AdamW on main_grad."""

    def __init__(self, model: nn.Module, cfg: ParallelConfig, groups: ParallelGroups, **optim):
        self.groups = groups
        self.model = wrap_megatron_ddp(model, cfg)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = adamw(self.params, **optim)

    def step(self, loss_fn, num_tokens: int, inspect_grads=None) -> float:
        """One optimizer step; returns the global token-mean loss.

        inspect_grads: optional callable(dict name -> full reduced grad), called before the optimizer step (tests);
            the tensors alias megatron's grad buffer, which the next step overwrites: clone what you keep.
        """
        tokens = torch.tensor([float(num_tokens)])
        dist.all_reduce(tokens, group=self.groups.dp)
        self.model.zero_grad_buffer()
        loss_sum = loss_fn(self.model)
        (loss_sum / tokens).backward()
        self.model.finish_grad_sync()
        for p in self.params:
            p.grad = p.main_grad.to(p.dtype) if p.main_grad.dtype != p.dtype else p.main_grad
        if inspect_grads is not None:
            inspect_grads({n: p.grad for n, p in self.model.module.named_parameters() if p.requires_grad})
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        report = loss_sum.detach().reshape(1).clone()
        dist.all_reduce(report, group=self.groups.dp)
        return (report / tokens).item()


class DeepSpeedEngine:
    """DeepSpeed engine with ZeRO stage cfg.zero_stage (0/1/2) and a client torch AdamW (no JIT FusedAdam)."""

    def __init__(
        self, model: nn.Module, cfg: ParallelConfig, groups: ParallelGroups, **optim
    ):
        self.groups, self.dp = groups, groups.dp_size
        self.model = wrap_deepspeed(model, adamw(model.parameters(), **optim), cfg)
        self.optimizer = self.model.optimizer

    def step(self, loss_fn, num_tokens: int, inspect_grads=None) -> float:
        """One optimizer step; returns the global token-mean loss (inspect_grads: see MegatronDDPEngine.step)."""
        tokens = torch.tensor([float(num_tokens)])
        dist.all_reduce(tokens, group=self.groups.dp)
        loss_sum = loss_fn(self.model)
        # DeepSpeed averages gradients over dp: scale by dp so the result is the sum / global tokens.
        self.model.backward(loss_sum * (self.dp / tokens.item()))
        if inspect_grads is not None:
            from deepspeed.utils import safe_get_full_grad

            inspect_grads({n: safe_get_full_grad(p) for n, p in self.model.module.named_parameters()})
        self.model.step()
        report = loss_sum.detach().float().reshape(1).clone()
        dist.all_reduce(report, group=self.groups.dp)
        return (report / tokens).item()


def build_engine(model: nn.Module, cfg: ParallelConfig, groups: ParallelGroups, **kwargs):
    """The data-parallel engine `cfg.engine` selects ("megatron_ddp" or "deepspeed")."""
    if cfg.engine == "megatron_ddp":
        return MegatronDDPEngine(model, cfg, groups, **kwargs)
    if cfg.engine == "deepspeed":
        return DeepSpeedEngine(model, cfg, groups, **kwargs)
    raise ValueError(f"engine={cfg.engine!r} is unknown; use 'megatron_ddp' or 'deepspeed'")
