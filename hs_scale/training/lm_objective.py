"""The decoder-only LM's training objective (model.arch == "lm"), and its hook into the step engine.

Legend: B rows, L tokens per row, V vocabulary, K tasks.

The batch is a packed hs_scale.data.packing.LMBatch: every token has its document's task id, positions restart
per document and attention stays inside a document (doc_ids). The loss is next-token cross-entropy summed over
the tokens that have a target (IGNORE_INDEX at document ends and padding), optionally label-smoothed; the engine
divides it by the global token count, so the step minimises the token mean over the global batch, as for the
encoder-decoders. Per-task sums account each token's nll to its own document's task (a row may mix languages).

`LMObjective` has the methods of the step-engine rewrite's Objective protocol (num_tokens, __call__, selection_kl,
flop_counter; `LMOutput` has ObjectiveOutput's fields but ctc_sum). `LMStepEngine` plugs it into the current
StepEngine for a replicated model (one process, megatron DDP, DeepSpeed ZeRO); tensor/pipeline parallel LM training
is not wired here (hs_scale.config refuses it for arch lm).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hs_scale.data.packing import IGNORE_INDEX, LMBatch
from hs_scale.training.engine import StepEngine, StepResult
from hs_scale.training.loss import token_losses


@dataclass
class LMOutput:
    """The losses of one packed micro-batch.

    loss_sum: float scalar, differentiable (the engine divides by the global token count).
    nll_BL:   float [B, L], detached: per-token nll without smoothing, 0 where there is no target.
    mask_BL:  bool [B, L]: the tokens with a target.
    task:     long [B, L]: each token's task (its document's).
    hits_BL:  bool [B, L] or None: argmax == target (token accuracy).
    """

    loss_sum: Tensor
    nll_BL: Tensor
    mask_BL: Tensor
    task: Tensor
    hits_BL: Tensor | None = None

    def per_task(self, num_tasks: int) -> Tensor:
        """float [3, K]: nll sum, token count and correct-token count per task."""
        mask = self.mask_BL.float()
        hits = mask * 0 if self.hits_BL is None else self.hits_BL.float() * mask
        out = torch.zeros(3, num_tasks, device=self.nll_BL.device)
        for row, values in enumerate((self.nll_BL.float() * mask, mask, hits)):
            out[row].index_add_(0, self.task.flatten(), values.flatten())
        return out


class LMObjective:
    """Next-token cross-entropy of a packed LMBatch on hs_scale.models.lm.LMModel."""

    def __init__(self, model_cfg=None):
        del model_cfg  # nothing in the LM objective depends on the model's config

    def num_tokens(self, batch: LMBatch) -> int:
        return batch.num_tokens

    def __call__(self, model: nn.Module, batch: LMBatch, *, label_smoothing: float,
                 with_hits: bool = False) -> LMOutput:
        logits_BLV = model(batch.input_ids, task_BL=batch.task_ids, position_ids_BL=batch.position_ids,
                           doc_ids_BL=batch.doc_ids)
        loss_sum, nll_BL = token_losses(logits_BLV, batch.targets, IGNORE_INDEX, label_smoothing)
        hits_BL = logits_BLV.argmax(-1) == batch.targets if with_hits else None
        return LMOutput(loss_sum, nll_BL, batch.targets != IGNORE_INDEX, batch.task_ids, hits_BL)

    def selection_kl(self, module: nn.Module, batch: LMBatch) -> Tensor:
        """The selector's KL prior averaged over the tasks with a target in this batch (unweighted)."""
        return module.selection_kl(batch.task_ids[batch.targets != IGNORE_INDEX])

    def flop_counter(self, model: nn.Module) -> Callable[[LMBatch], float]:
        """6 x params x positions (forward 2, backward 4), selector logits left out: a lower bound ignoring the
        attention-score terms, as for the encoder-decoders."""
        params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("selector."))
        return lambda batch: 6.0 * params * float(batch.input_ids.numel())


class LMStepEngine(StepEngine):
    """StepEngine with the LM objective in place of the seq2seq loss; every other part (optimizer, data-parallel
    wrappers, non-finite skip, checkpoints) is the StepEngine's."""

    def __init__(self, model: nn.Module, train_cfg, selection_cfg, parallel_cfg, dp_group, pad_id: int,
                 num_tasks: int, device: torch.device):
        # StepEngine switches checkpointing on per encoder/decoder stack; the LM has one layer stack of its own.
        super().__init__(model, dataclasses.replace(train_cfg, activation_checkpointing=False), selection_cfg,
                         parallel_cfg, dp_group, pad_id, num_tasks, device)
        model.checkpoint_activations = train_cfg.activation_checkpointing
        self.objective = LMObjective()
        self._flops = self.objective.flop_counter(model)

    def _num_tokens(self, batch: LMBatch) -> int:
        return self.objective.num_tokens(batch)

    def flops(self, batch: LMBatch) -> float:
        return self._flops(batch)

    def selection_table(self) -> dict | None:
        """{"decoder_self": table[task][layer]} (the LM's one attention type), None for a dense model."""
        table = self.module.head_selection_table()
        return None if table is None else {"decoder_self": table}

    def _micro_loss(self, batch: LMBatch, global_tokens: float):
        """(scaled loss to backpropagate, nll sums per task [K], tokens per task [K], raw loss sum, CTC sum = 0)."""
        with self._autocast():
            out = self.objective(self.wrapped, batch, label_smoothing=self.cfg.label_smoothing)
        sums = out.per_task(self.num_tasks)
        # megatron DDP sums gradients over dp; DeepSpeed averages them (hence x dp), as in StepEngine.
        scaled = out.loss_sum * ((self.dp_size if self.kind == "deepspeed" else 1.0) / global_tokens)
        if self.selection_cfg.kl_weight > 0:
            kl_scale = 1.0 if self.kind == "deepspeed" else 1.0 / self.dp_size
            kl = self.objective.selection_kl(self.module, batch)
            scaled = scaled + self.selection_cfg.kl_weight * kl * kl_scale / self.cfg.grad_accum
        return scaled, sums[0], sums[1], out.loss_sum.detach(), torch.zeros((), device=self.device)

    def _result(self, stats: Tensor, global_tokens: float, grad_norm: float, skipped: bool) -> StepResult:
        K, n = self.num_tasks, max(global_tokens, 1.0)
        return StepResult(float(stats[0]) / n, int(global_tokens), grad_norm, stats[2:2 + K], stats[2 + K:], skipped)

    @torch.no_grad()
    def evaluate(self, batches, task_names: list[str]) -> dict:
        """Next-token nll, perplexity and token accuracy, overall and per task, over this rank's batches (summed
        over dp; padding batches skipped)."""
        model = self.module
        model.eval()
        K = len(task_names)
        sums = torch.zeros(3, K)  # nll, tokens, correct
        for batch in batches:
            if batch.is_padding:
                continue
            batch = batch.to(self.device)
            with self._autocast():
                out = self.objective(model, batch, label_smoothing=0.0, with_hits=True)
            sums += out.per_task(K).cpu()
        self._all_reduce(sums)
        model.train()
        seen = [k for k in range(K) if sums[1, k] > 0]
        nll = float(sums[0].sum() / sums[1].sum().clamp(min=1))
        return {
            "nll": nll, "ppl": math.exp(min(nll, 50.0)),
            "token_accuracy": float(sums[2].sum() / sums[1].sum().clamp(min=1)),
            "nll_per_task": {task_names[k]: float(sums[0, k] / sums[1, k]) for k in seen},
            "ppl_per_task": {task_names[k]: math.exp(min(float(sums[0, k] / sums[1, k]), 50.0)) for k in seen},
            "token_accuracy_per_task": {task_names[k]: float(sums[2, k] / sums[1, k]) for k in seen},
        }
