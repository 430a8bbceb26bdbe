"""The one step engine: an optimizer step over micro-batches on every layout (one process, megatron-core DDP,
DeepSpeed ZeRO, TP, PP, TP x PP, all x DP).

    engine = StepEngine(model, train_cfg, selection_cfg, parallel_cfg, groups, num_tasks, device)
    result = engine.train_step(microbatches)          # StepResult: loss, per-task nll, grad norm, skipped
    evals = engine.evaluate(batches, task_names)      # teacher-forced nll (and accuracy) per task
    table = engine.selection_table()                  # full table, gathered from TP / PP shards (collective)

One step, whatever the layout (B micro-batches of this dp rank, N their global target tokens):
  1. N = all-reduce over dp of the objective's token count (hs_scale.training.objective);
  2. KL prior (selection.kl_weight > 0): backward of kl_weight x the selectors' KL, averaged over micro-batches
     and dp ranks; every rank holds the selector slices of its own layers / pool partition, and the slices' KL
     terms sum to the single-device one, so each rank backpropagates its own share;
  3. forward + backward of every micro-batch: loss_sum / N (the objective's CE, or CE/CTC mix) through
     - a plain loop (pp = 1: one process, DDP, TP), with megatron DDP's no_sync on all but the last one, or
     - megatron-core's pipeline schedule (pp > 1, `get_forward_backward_func`) with the same loss function;
     DeepSpeed (pp = 1) instead sums the micro-batches' losses and backpropagates once (its engine reduces
     gradients inside backward; activation memory grows with train.grad_accum on this engine);
  4. gradient sync (megatron DDP: finish_grad_sync, embedding copies over pp), one all-reduce of the reported
     sums [loss, ctc, nll per task, tokens per task] over pp then dp;
  5. one grad norm over tp x pp (`hs_scale.parallel.api.clip_grad_norm`), clipping, and the one skip rule: a
     non-finite loss or grad norm skips the step on every rank (the decision uses all-reduced values);
  6. AdamW (`build_optimizer`: no decay on biases, norms and selector logits) and the LR schedule.
megatron DDP sums gradients over dp; DeepSpeed averages them, so its losses are scaled by dp.

Checkpoints (every layout): `engine.optimizer` is what the trainer hands to the checkpoint manager, and the format
is layout-free (AdamW state per parameter name); `checkpoint_model` is the model (replicated) or the list of this
rank's chunks (TP / PP). Under DeepSpeed ZeRO 1/2 the client AdamW steps flat fp32 partitions, so
`engine.optimizer` is a ZeroCheckpointOptimizer (hs_scale.training.zero_state) over it that gathers / scatters
full per-parameter state; the LambdaLR scheduler stays on the client AdamW, whose param_groups dicts DeepSpeed
steps with. A ZeRO checkpoint therefore loads under any engine and layout, and any engine's checkpoint loads under
ZeRO (the trainer still resumes only at the same dp size: data cursor). Limitation: with parallel.bf16 the model
parameters (hence the checkpoint) are bf16, and so is the optimizer state read back into them: the fp32 master
weights and moments are rounded on resume (fp32 runs resume bitwise).
"""

from __future__ import annotations

import math
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from hs_scale.parallel.api import clip_grad_norm, parallelize_model, run_pipeline_schedule, sync_shared_embedding
from hs_scale.parallel.data_parallel import wrap_deepspeed, wrap_megatron_ddp
from hs_scale.parallel.layout import ParallelConfig, ParallelGroups
from hs_scale.selection.config import SelectionConfig
from hs_scale.training.config import TrainConfig
from hs_scale.training.objective import ObjectiveOutput, objective_for
from hs_scale.training.optim import build_optimizer
from hs_scale.training.zero_state import ZeroCheckpointOptimizer, checkpoint_optimizer


@dataclass
class StepResult:
    loss: float  # global token-mean training loss: (1 - ctc_weight) x label-smoothed CE + ctc_weight x CTC, no KL
    tokens: int  # global target tokens
    grad_norm: float  # before clipping
    nll_per_task: torch.Tensor  # float [K]: global nll sums per task
    tokens_per_task: torch.Tensor  # float [K]
    skipped: bool
    ctc_loss: float = float("nan")  # global token-mean CTC loss (NaN without a CTC head)


def gather_selection_table(modules: list[nn.Module], groups: ParallelGroups | None) -> dict:
    """The full deterministic selection table {type: table[task][layer] = pool heads in slot order}.

    Each selector holds the layers from `first_layer` on (pipeline stages) and, under TP, the slots of pool
    partition `tp_rank` (its `table()` gives global pool-head indices; slots follow rank order). Collective over
    the model-parallel group when there is one: call it on every rank.
    """
    pieces = [(name, sel.first_layer, getattr(sel, "tp_rank", 0), sel.table())
              for m in modules for name, sel in getattr(m, "selectors", {}).items()]
    if groups is not None and groups.tp_size * groups.pp_size > 1:
        from megatron.core import parallel_state

        everyone = [None] * (groups.tp_size * groups.pp_size)
        dist.all_gather_object(everyone, pieces, group=parallel_state.get_model_parallel_group())
        pieces = [p for rank_pieces in everyone for p in rank_pieces]
    order = list(dict.fromkeys(p[0] for p in pieces))  # the model's type order (first stage's types first)
    tables: dict = {name: None for name in order}
    for name, first, _, table in sorted(pieces, key=lambda p: (order.index(p[0]), p[1], p[2])):
        full = tables[name] = tables[name] or [[] for _ in table]
        for k, per_layer in enumerate(table):
            for j, heads in enumerate(per_layer):
                while len(full[k]) <= first + j:
                    full[k].append([])
                full[k][first + j] += heads
    return tables


class StepEngine:
    """The trainer's step engine on every layout (module docstring).

    model: the built single-device model (seeded identically on every rank); with tp x pp > 1 it is cut into this
    rank's chunks (consumed). groups: the megatron-core groups of a multi-process run, None for one process.
    """

    def __init__(self, model: nn.Module, train_cfg: TrainConfig, selection_cfg: SelectionConfig,
                 parallel_cfg: ParallelConfig, groups: ParallelGroups | None, num_tasks: int, device: torch.device):
        self.cfg, self.selection_cfg, self.groups = train_cfg, selection_cfg, groups
        self.num_tasks, self.device = num_tasks, device
        self.objective = objective_for(model.config)
        self._flops = self.objective.flop_counter(model)  # the dense sizes, before any sharding
        self._ctc = self.objective.has_ctc
        self.dp_size = 1 if groups is None else groups.dp_size
        model_parallel = 1 if groups is None else groups.tp_size * groups.pp_size
        self.world_size = self.dp_size * model_parallel
        self.kind = "local" if groups is None else parallel_cfg.engine
        self.staged = model_parallel > 1  # modules are pipeline chunks; the last returns the loss dict
        self.pipelined = groups is not None and groups.pp_size > 1
        if self.staged:
            self.modules = [c.to(device) for c in
                            parallelize_model(model, parallel_cfg, groups, label_smoothing=train_cfg.label_smoothing)]
        else:
            self.modules = [model]
            if train_cfg.activation_checkpointing:
                model.enable_activation_checkpointing()
        self.optimizer, self.scheduler = build_optimizer(self.modules, train_cfg)
        self.wrapped: list[nn.Module] = list(self.modules)
        if self.kind == "megatron_ddp":
            # Bucketing only pays with overlap; later chunks of an interleaved pipeline skip it (as megatron does).
            self.wrapped = [wrap_megatron_ddp(m, parallel_cfg, m.config if self.staged else None,
                                              disable_bucketing=i > 0) for i, m in enumerate(self.modules)]
        elif self.kind == "deepspeed":
            (module,) = self.modules  # validate_layout refuses pp > 1 with deepspeed
            mpu = None
            if self.staged:  # TP shards differ per rank: DeepSpeed must reduce gradients over the dp group only
                from megatron.core import parallel_state as mpu
            # hs_scale sums its micro-batches before the one backward: DeepSpeed accumulates nothing itself.
            self.wrapped = [wrap_deepspeed(module, self.optimizer, parallel_cfg, clip_norm=train_cfg.clip_norm,
                                           mpu=mpu)]
            # ZeRO 1/2 swapped the client AdamW's params for flat partitions: checkpoints see per-parameter state
            # through this view (ZeRO 0: the client AdamW itself). The scheduler keeps driving the client's lr.
            self.optimizer = checkpoint_optimizer(self.wrapped[0])

    # ------------------------------------------------------------------ what the trainer asks of every engine
    @property
    def checkpoint_model(self) -> nn.Module | list[nn.Module]:
        return self.modules if self.staged else self.modules[0]

    def set_temperature(self, tau: float) -> None:
        for m in self.modules:
            m.set_selection_temperature(tau)

    def selection_table(self) -> dict:
        """The full selection table (collective under TP / PP: every rank calls it)."""
        return gather_selection_table(self.modules, self.groups)

    def flops(self, batch) -> float:
        """Training FLOPs of one micro-batch of the whole model (every layout counts the dense model)."""
        return self._flops(batch)

    def train_step(self, microbatches: list) -> StepResult:
        batches = [self._on_device(b) for b in microbatches]
        if self.kind == "deepspeed":
            return self._deepspeed_step(batches)
        stats, tokens = self.forward_backward(batches)
        grad_norm = clip_grad_norm(self.modules, self.groups, self.cfg.clip_norm)
        skipped = not (math.isfinite(float(stats[0])) and math.isfinite(grad_norm))
        if not skipped:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self._result(stats, tokens, grad_norm, skipped)

    def forward_backward(self, batches: list) -> tuple[Tensor, float]:
        """Gradients of one step in every parameter's `.grad` (reduced over dp, embedding copies summed); returns
        (all-reduced [loss sum, ctc sum, nll (K), tokens (K), hits (K)], global tokens). Not for DeepSpeed."""
        for m in self.modules:
            m.train()
        tokens = self._global_tokens(batches)
        if self.kind == "megatron_ddp":
            for w in self.wrapped:
                w.zero_grad_buffer()
        self.optimizer.zero_grad(set_to_none=True)
        if self.selection_cfg.enabled and self.selection_cfg.kl_weight > 0:
            with self._no_sync():
                (self._kl(batches) / self.dp_size).backward()
        stats = self._run(batches, tokens, forward_only=False)
        if self.kind == "megatron_ddp":
            for w in self.wrapped:
                w.finish_grad_sync()
            if self.staged:
                sync_shared_embedding(self.modules, self.groups)
            for m in self.modules:
                for p in m.parameters():
                    if p.requires_grad:
                        p.grad = p.main_grad.to(p.dtype) if p.main_grad.dtype != p.dtype else p.main_grad
        return self._reduce(stats), tokens

    @torch.no_grad()
    def evaluate(self, batches, task_names: list[str]) -> dict:
        """Teacher-forced loss, nll per task (and token accuracy where full logits exist: replicated models) over
        this rank's batches, summed over dp, with deterministic head selection."""
        for m in self.modules:
            m.eval()
        K = len(task_names)
        real = (self._on_device(b) for b in batches if not b.is_padding)  # padding batches keep ranks in step
        if self.pipelined:  # one schedule over every batch (an interleaved one needs several micro-batches)
            real = list(real)
            runs = [real] if real else []
        else:  # streamed: one batch on the device at a time
            runs = ([b] for b in real)
        sums = torch.zeros(2 + 3 * K, device=self.device)
        for run in runs:
            sums += self._run(run, 1.0, forward_only=True)
        sums = self._reduce(sums).cpu()
        for m in self.modules:
            m.train()
        nll, tok, hits = sums[2:2 + K], sums[2 + K:2 + 2 * K], sums[2 + 2 * K:]
        seen = [k for k in range(K) if tok[k] > 0]
        result = {
            "loss": float(sums[0] / tok.sum().clamp(min=1)),  # the training objective (label smoothing, CTC)
            "nll": float(nll.sum() / tok.sum().clamp(min=1)),
            "nll_per_task": {task_names[k]: float(nll[k] / tok[k]) for k in seen},
        }
        # Perplexity, exp(nll) (capped: an untrained model's nll can overflow exp).
        result["ppl"] = math.exp(min(result["nll"], 50.0))
        result["ppl_per_task"] = {task: math.exp(min(v, 50.0)) for task, v in result["nll_per_task"].items()}
        if not self.staged:
            result["token_accuracy"] = float(hits.sum() / tok.sum().clamp(min=1))
            result["token_accuracy_per_task"] = {task_names[k]: float(hits[k] / tok[k]) for k in seen}
        return result

    # ------------------------------------------------------------------ internals
    def _on_device(self, batch):
        return batch if self.device.type == "cpu" else batch.to(self.device)  # CPU batches are used as they are

    def _autocast(self):
        if self.cfg.dtype == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _no_sync(self):
        """megatron DDP: hold the gradient reduction (gradients only accumulate into main_grad)."""
        stack = ExitStack()
        if self.kind == "megatron_ddp":
            for w in self.wrapped:
                stack.enter_context(w.no_sync())
        return stack

    def _global_tokens(self, batches: list) -> float:
        tokens = torch.tensor([float(sum(self.objective.num_tokens(b) for b in batches))], device=self.device)
        if self.groups is not None and self.dp_size > 1:
            dist.all_reduce(tokens, group=self.groups.dp)
        return float(tokens[0])

    def _reduce(self, stats: Tensor) -> Tensor:
        """Sum the reported sums (on the device: NCCL reduces CUDA tensors) over pp (only the last stage computed
        them) and dp."""
        if self.pipelined:
            dist.all_reduce(stats, group=self.groups.pp)
        if self.groups is not None and self.dp_size > 1:
            dist.all_reduce(stats, group=self.groups.dp)
        return stats

    def _kl(self, batches: list) -> Tensor:
        """kl_weight x the selectors' KL (this rank's share), averaged over the micro-batches."""
        kl = sum(self.objective.selection_kl(m, b) for m in self.modules for b in batches)
        return self.selection_cfg.kl_weight * kl.to(self.device) / len(batches)

    def _output(self, model: nn.Module, batch, forward_only: bool) -> ObjectiveOutput:
        """The objective's output of one micro-batch on a replicated model or a (single, last) TP stage."""
        with self._autocast():
            if self.staged:
                return self.objective.from_stage(model(batch), batch)
            return self.objective(model, batch, label_smoothing=self.cfg.label_smoothing, with_hits=forward_only)

    def _account(self, out: ObjectiveOutput) -> Tensor:
        """float [2 + 3K] on the device: loss sum, CTC sum, then nll, tokens and correct tokens per task."""
        loss = out.loss_sum.detach().float().reshape(1).to(self.device)
        ctc = torch.zeros(1, device=self.device) if out.ctc_sum is None else out.ctc_sum.float().reshape(1)
        return torch.cat([loss, ctc.to(self.device), out.per_task(self.num_tasks).flatten().to(self.device)])

    def _run(self, batches: list, tokens: float, forward_only: bool) -> Tensor:
        """Forward (and backward unless forward_only) of every micro-batch; this rank's summed accounting."""
        stats = torch.zeros(2 + 3 * self.num_tasks, device=self.device)
        if self.pipelined:
            def forward_step(batch, model):
                out = model(batch)
                if not isinstance(out, dict):  # not the last stage: the p2p tensor
                    return out, None

                def loss_func(_loss_sum):
                    result = self.objective.from_stage(out, batch)
                    return result.loss_sum / tokens, result.mask_BL.sum().int(), {"stats": self._account(result)}

                return out["loss_sum"], loss_func

            for report in run_pipeline_schedule(self.wrapped, self.modules, batches, forward_step, forward_only):
                stats += report["stats"]
            return stats
        (model,) = self.modules if forward_only else self.wrapped
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            with nullcontext() if last or forward_only else self._no_sync():
                out = self._output(model, batch, forward_only)
                if not forward_only:
                    (out.loss_sum / tokens).backward()
            stats += self._account(out)
        return stats

    def _result(self, stats: Tensor, global_tokens: float, grad_norm: float, skipped: bool) -> StepResult:
        K, n, stats = self.num_tasks, max(global_tokens, 1.0), stats.cpu()
        ctc = float(stats[1]) / n if self._ctc else float("nan")
        return StepResult(float(stats[0]) / n, int(global_tokens), grad_norm, stats[2:2 + K], stats[2 + K:2 + 2 * K],
                          skipped, ctc)

    def _deepspeed_step(self, batches: list) -> StepResult:
        """DeepSpeed reduces gradients inside backward: check the summed loss first, then one backward + step."""
        (engine,) = self.wrapped
        engine.train()
        tokens = self._global_tokens(batches)
        outs = [self._output(engine, b, forward_only=False) for b in batches]
        stats = self._reduce(sum(self._account(o) for o in outs))
        if not math.isfinite(float(stats[0])):
            return self._result(stats, tokens, float("nan"), True)
        # DeepSpeed averages gradients over dp: x dp makes the update the sum / global tokens.
        loss = sum(o.loss_sum for o in outs) * (self.dp_size / tokens)
        if self.selection_cfg.enabled and self.selection_cfg.kl_weight > 0:
            loss = loss + self._kl(batches)
        engine.backward(loss)
        engine.step()
        self.scheduler.step()
        if isinstance(self.optimizer, ZeroCheckpointOptimizer):  # a checkpoint's gathered state is stale: free it
            self.optimizer.release()
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        return self._result(stats, tokens, grad_norm, False)
