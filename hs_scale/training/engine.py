"""One optimizer step over micro-batches, for a replicated model: one process, megatron-core DDP or DeepSpeed.

Loss semantics (every engine): the step minimises the token-mean label-smoothed cross-entropy over the *global*
batch (all micro-batches of all data-parallel ranks), plus kl_weight x the selectors' KL averaged over them.
The global target-token count is all-reduced first, so each rank backpropagates loss_sum / global_tokens.

Non-finite steps are skipped on every rank at once (the decision uses all-reduced values) and counted by the
trainer. megatron DDP / local: micro-batches are backpropagated one by one and the step is dropped afterwards.
DeepSpeed: its engine reduces gradients inside backward, so the losses of all micro-batches are checked first and
backpropagated together (activation memory grows with train.grad_accum on this engine).

Checkpoints (every engine): `engine.optimizer` is what the trainer hands to the checkpoint manager, and the format
is layout-free (AdamW state per parameter name). Under DeepSpeed ZeRO 1/2 the client AdamW steps flat fp32
partitions, so `engine.optimizer` is a ZeroCheckpointOptimizer (hs_scale.training.zero_state) over it that gathers
/ scatters full per-parameter state; the LambdaLR scheduler stays on the client AdamW, whose param_groups dicts
DeepSpeed steps with (the lr it applies is the scheduler's). A ZeRO checkpoint therefore loads under any engine and
layout, and any engine's checkpoint loads under ZeRO (the trainer still resumes only at the same dp size: data
cursor). Limitation: with parallel.bf16 the model parameters
(hence the checkpoint) are bf16, and so is the optimizer state read back into them: the fp32 master weights and
moments are rounded on resume (fp32 runs resume bitwise).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from hs_scale.models.ctc import ctc_loss_sum, hybrid_loss
from hs_scale.parallel.data_parallel import wrap_deepspeed, wrap_megatron_ddp
from hs_scale.parallel.layout import ParallelConfig
from hs_scale.selection.config import SelectionConfig
from hs_scale.training.config import TrainConfig
from hs_scale.training.loss import token_losses
from hs_scale.training.optim import build_optimizer
from hs_scale.training.zero_state import checkpoint_optimizer


@dataclass
class StepResult:
    loss: float  # global token-mean training loss: (1 - ctc_weight) x label-smoothed CE + ctc_weight x CTC, no KL
    tokens: int  # global target tokens
    grad_norm: float  # before clipping
    nll_per_task: torch.Tensor  # float [K]: global nll sums per decoder task
    tokens_per_task: torch.Tensor  # float [K]
    skipped: bool
    ctc_loss: float = float("nan")  # global token-mean CTC loss (NaN without a CTC head)


def model_flops(model: nn.Module, batch) -> float:
    """Training FLOPs of one batch, 6 x params x positions (forward 2, backward 4), encoder and decoder apart.

    A lower bound that ignores the attention score terms (benchmarks/train_throughput.py counts them too).
    """
    enc = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("decoder.", "selectors.")))
    dec = sum(p.numel() for n, p in model.named_parameters() if n.startswith("decoder."))
    if getattr(batch, "features", None) is not None:
        src = float(batch.feature_lengths.sum()) / 4  # two stride-2 convolutions
    else:
        src = float(batch.source_lengths.sum())
    return 6.0 * (enc * src + dec * float(batch.num_target_tokens))


def model_logits(model: nn.Module, batch, return_ctc: bool = False):
    """logits_BLV of a teacher-forced batch, speech (features) or text (source_tokens).

    return_ctc (speech models with a CTC head): (logits_BLV, ctc_logits_BSV, encoder_lengths_B).
    """
    if getattr(batch, "features", None) is not None:
        return model(batch.features, batch.feature_lengths, batch.decoder_input, batch.src_task, batch.tgt_task,
                     **({"return_ctc": True} if return_ctc else {}))
    return model(batch.source_tokens, batch.decoder_input, batch.src_task, batch.tgt_task)


def joint_loss_sum(model: nn.Module, batch, pad_id: int, label_smoothing: float, ctc_weight: float):
    """(loss sum to backpropagate, per-token nll [B, L], CTC loss sum or None) of one teacher-forced batch.

    loss = (1 - ctc_weight) x label-smoothed CE + ctc_weight x CTC, both summed over the batch; the caller divides
    by the global target-token count (tokens + EOS), so both terms share one normalisation.
    """
    if ctc_weight <= 0:
        loss_sum, nll = token_losses(model_logits(model, batch), batch.target, pad_id, label_smoothing)
        return loss_sum, nll, None
    logits, ctc_logits, enc_lengths = model_logits(model, batch, return_ctc=True)
    ce_sum, nll = token_losses(logits, batch.target, pad_id, label_smoothing)
    ctc_sum = ctc_loss_sum(ctc_logits, enc_lengths, batch.target, batch.target_lengths, blank=pad_id)
    return hybrid_loss(ce_sum, ctc_sum, ctc_weight), nll, ctc_sum.detach()


class StepEngine:
    def __init__(self, model: nn.Module, train_cfg: TrainConfig, selection_cfg: SelectionConfig,
                 parallel_cfg: ParallelConfig, dp_group, pad_id: int, num_tasks: int, device: torch.device):
        self.module, self.cfg, self.selection_cfg = model, train_cfg, selection_cfg
        self.pad_id, self.num_tasks, self.device = pad_id, num_tasks, device
        self.dp_group = dp_group
        self.dp_size = 1 if dp_group is None else dist.get_world_size(dp_group)
        self.kind = "local" if dp_group is None else parallel_cfg.engine
        self.optimizer, self.scheduler = build_optimizer(model, train_cfg)
        if train_cfg.activation_checkpointing:
            for stack in (getattr(model, "encoder", None), model.decoder):
                if stack is not None:
                    stack.checkpoint_activations = True
        self.wrapped: nn.Module = model
        if self.kind == "megatron_ddp":
            self.wrapped = wrap_megatron_ddp(model, parallel_cfg)
        elif self.kind == "deepspeed":
            # hs_scale sums its micro-batches before the one backward: DeepSpeed accumulates nothing itself.
            self.wrapped = wrap_deepspeed(model, self.optimizer, parallel_cfg, clip_norm=train_cfg.clip_norm)
            # ZeRO 1/2 swapped the client AdamW's params for flat partitions: checkpoints see per-parameter state
            # through this view (ZeRO 0: the client AdamW itself). The scheduler keeps driving the client's lr.
            self.optimizer = checkpoint_optimizer(self.wrapped)

    # ------------------------------------------------------------------ what the trainer asks of every engine
    @property
    def checkpoint_model(self) -> nn.Module:
        return self.module

    def set_temperature(self, tau: float) -> None:
        self.module.set_selection_temperature(tau)

    def selection_table(self) -> dict:
        return self.module.head_selection_table()

    def flops(self, batch) -> float:
        return model_flops(self.module, batch)

    @torch.no_grad()
    def evaluate(self, batches, task_names: list[str]) -> dict:
        """Teacher-forced nll and token accuracy per task over this rank's batches, summed over dp."""
        model = self.module
        model.eval()
        K = len(task_names)
        sums = torch.zeros(3, K)  # nll, correct, tokens
        for batch in batches:
            if batch.is_padding:  # repeated to keep ranks in step; not data
                continue
            batch = batch.to(self.device)
            with self._autocast():
                logits = model_logits(model, batch).float()
            mask = batch.target != self.pad_id
            _, nll = token_losses(logits, batch.target, self.pad_id, 0.0)
            hits = (logits.argmax(-1) == batch.target).float()
            for row, values in ((0, nll), (1, hits), (2, torch.ones_like(hits))):
                sums[row].index_add_(0, batch.tgt_task.cpu(), (values * mask).sum(1).cpu())
        self._all_reduce(sums)
        model.train()
        seen = [k for k in range(K) if sums[2, k] > 0]
        return {
            "nll": float(sums[0].sum() / sums[2].sum().clamp(min=1)),
            "token_accuracy": float(sums[1].sum() / sums[2].sum().clamp(min=1)),
            "nll_per_task": {task_names[k]: float(sums[0, k] / sums[2, k]) for k in seen},
            "token_accuracy_per_task": {task_names[k]: float(sums[1, k] / sums[2, k]) for k in seen},
        }

    # ------------------------------------------------------------------ internals
    def _autocast(self):
        if self.cfg.dtype == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _num_tokens(self, batch) -> int:
        """Target tokens of one micro-batch (the loss normaliser; LMStepEngine counts packed LM targets)."""
        return int((batch.target != self.pad_id).sum())

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.dp_group is not None:
            dist.all_reduce(t, group=self.dp_group)
        return t

    def _micro_loss(self, batch, global_tokens: float):
        """(scaled loss to backpropagate, nll sums per task [K], tokens per task [K], raw loss sum, CTC sum)."""
        ctc_weight = self.module.config.ctc_weight
        with self._autocast():
            loss_sum, nll, ctc_sum = joint_loss_sum(self.wrapped, batch, self.pad_id, self.cfg.label_smoothing,
                                                    ctc_weight)
        mask = (batch.target != self.pad_id).float()
        nll_k = torch.zeros(self.num_tasks, device=self.device).index_add_(0, batch.tgt_task, (nll * mask).sum(1))
        tok_k = torch.zeros(self.num_tasks, device=self.device).index_add_(0, batch.tgt_task, mask.sum(1))
        # megatron DDP sums gradients over dp; DeepSpeed averages them (hence x dp).
        scale = self.dp_size if self.kind == "deepspeed" else 1.0
        scaled = loss_sum * (scale / global_tokens)
        if self.selection_cfg.kl_weight > 0:
            kl = self.module.selection_kl(src_task_B=batch.src_task, tgt_task_B=batch.tgt_task)
            kl_scale = 1.0 if self.kind == "deepspeed" else 1.0 / self.dp_size
            scaled = scaled + self.selection_cfg.kl_weight * kl * kl_scale / self.cfg.grad_accum
        ctc_sum = torch.zeros((), device=self.device) if ctc_sum is None else ctc_sum
        return scaled, nll_k, tok_k, loss_sum.detach(), ctc_sum

    def train_step(self, microbatches: list) -> StepResult:
        self.wrapped.train()
        batches = [b.to(self.device) for b in microbatches]
        local_tokens = sum(self._num_tokens(b) for b in batches)
        global_tokens = float(self._all_reduce(torch.tensor([float(local_tokens)]))[0])
        if self.kind == "deepspeed":
            return self._deepspeed_step(batches, global_tokens)
        if self.kind == "megatron_ddp":
            self.wrapped.zero_grad_buffer()
        self.optimizer.zero_grad(set_to_none=True)
        nll_k = torch.zeros(self.num_tasks, device=self.device)
        tok_k, loss_total = torch.zeros_like(nll_k), torch.zeros((), device=self.device)
        ctc_total = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            sync = nullcontext() if last or self.kind != "megatron_ddp" else self.wrapped.no_sync()
            with sync:
                scaled, n, t, raw, ctc = self._micro_loss(batch, global_tokens)
                scaled.backward()
            nll_k, tok_k, loss_total, ctc_total = nll_k + n, tok_k + t, loss_total + raw, ctc_total + ctc
        if self.kind == "megatron_ddp":
            self.wrapped.finish_grad_sync()
            for p in self.module.parameters():
                if p.requires_grad:
                    p.grad = p.main_grad.to(p.dtype)
        sums = [loss_total.reshape(1).float(), ctc_total.reshape(1).float(), nll_k, tok_k]
        stats = self._all_reduce(torch.cat(sums))
        grad_norm = float(nn.utils.clip_grad_norm_(
            [p for p in self.module.parameters() if p.grad is not None],
            self.cfg.clip_norm if self.cfg.clip_norm > 0 else math.inf))
        loss = float(stats[0]) / max(global_tokens, 1.0)
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if not skipped:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self._result(stats, global_tokens, grad_norm, skipped)

    def _result(self, stats: torch.Tensor, global_tokens: float, grad_norm: float, skipped: bool) -> StepResult:
        """StepResult from the all-reduced [loss sum, CTC sum, nll per task (K), tokens per task (K)]."""
        K, n = self.num_tasks, max(global_tokens, 1.0)
        ctc = float(stats[1]) / n if self.module.config.ctc_weight > 0 else float("nan")
        return StepResult(float(stats[0]) / n, int(global_tokens), grad_norm, stats[2:2 + K], stats[2 + K:], skipped,
                          ctc)

    def _deepspeed_step(self, batches: list, global_tokens: float) -> StepResult:
        outs = [self._micro_loss(b, global_tokens) for b in batches]
        nll_k = sum(o[1] for o in outs)
        tok_k = sum(o[2] for o in outs)
        raw = sum(o[3] for o in outs)
        ctc = sum(o[4] for o in outs)
        stats = self._all_reduce(torch.cat([raw.reshape(1).float(), ctc.reshape(1).float(), nll_k, tok_k]))
        loss = float(stats[0]) / max(global_tokens, 1.0)
        if not math.isfinite(loss):
            return self._result(stats, global_tokens, float("nan"), True)
        self.wrapped.backward(sum(o[0] for o in outs))
        self.wrapped.step()
        self.scheduler.step()
        if hasattr(self.optimizer, "release"):  # the full state a checkpoint gathered is stale now: free it
            self.optimizer.release()
        grad_norm = self.wrapped.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        return self._result(stats, global_tokens, grad_norm, False)
