"""The step engine for tensor- and pipeline-parallel layouts: the trainer's seam onto hs_scale.parallel.api.

Same contract as StepEngine (train_step -> StepResult, evaluate, set_temperature, checkpoint_model, optimizer,
scheduler), backed by megatron-core's schedules and megatron DDP. What differs, and why:
  * per-task losses are not reported (the loss is reduced on the last pipeline stage as one sum);
  * the selection heatmap is not drawn (each rank holds the selector logits of its own layers and groups; the
    checkpoint consolidates them: `hs-scale evaluate` and `export-hf` see the full table);
  * the KL prior (selection.kl_weight > 0) is refused at config time: a stage's KL needs an auxiliary loss hook.
"""

from __future__ import annotations

import math

import torch

from hs_scale.parallel.api import (
    build_parallel_engine,
    build_parallel_model,
    clip_grad_norm,
    forward_backward,
    forward_eval_loss,
)
from hs_scale.training.engine import StepResult
from hs_scale.training.optim import build_scheduler


class ModelParallelStepEngine:
    def __init__(self, model_cfg, selection_cfg, parallel_cfg, train_cfg, groups, num_tasks: int,
                 device: torch.device):
        chunks = build_parallel_model(model_cfg, selection_cfg, num_tasks, parallel_cfg, groups,
                                      label_smoothing=train_cfg.label_smoothing)
        self.engine = build_parallel_engine(chunks, parallel_cfg, groups, lr=train_cfg.lr,
                                            betas=tuple(train_cfg.betas), eps=train_cfg.eps,
                                            weight_decay=train_cfg.weight_decay)
        self.cfg, self.device, self.num_tasks = train_cfg, device, num_tasks
        self.optimizer = self.engine.optimizer
        self.scheduler = build_scheduler(self.optimizer, train_cfg)
        self.dp_size = groups.dp_size

    @property
    def checkpoint_model(self) -> list:
        return self.engine.modules

    def set_temperature(self, tau: float) -> None:
        for module in self.engine.modules:
            module.set_selection_temperature(tau)

    def selection_table(self) -> None:
        return None

    def flops(self, batch) -> float:
        return 0.0  # not counted across shards; benchmarks/train_throughput.py reports MFU for these layouts

    def train_step(self, microbatches: list) -> StepResult:
        batches = [b.to(self.device) for b in microbatches]
        stats = forward_backward(self.engine, batches)
        grad_norm = clip_grad_norm(self.engine, self.cfg.clip_norm)
        skipped = not (math.isfinite(stats["loss"]) and math.isfinite(grad_norm))
        if not skipped:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        none = torch.zeros(self.num_tasks)
        ctc = stats["ctc"] if self.engine.modules[0].model_config.ctc_weight > 0 else float("nan")
        return StepResult(stats["loss"], int(stats["tokens"]), grad_norm, none, none, skipped, ctc)

    def evaluate(self, batches, task_names: list[str]) -> dict:
        real = [b.to(self.device) for b in batches if not b.is_padding]
        result = forward_eval_loss(self.engine, real)
        for module in self.engine.modules:
            module.train()
        return {"nll": result["nll"], "loss": result["loss"], "tokens": result["tokens"]}
