"""The training objective of a model family: the one seam between a model and the step engine.

Legend: B batch, L target length, V vocabulary, K tasks.

The step engine (hs_scale.training.engine) knows nothing about a model's inputs or loss: it asks the objective
registered for `model.config.arch` in `OBJECTIVES` for

    objective.num_tokens(batch)                      # normalisation: the engine all-reduces it over dp first
    objective(model, batch, label_smoothing=eps)     # forward of a replicated model -> ObjectiveOutput
    objective.from_stage(out, batch)                 # a last pipeline / TP stage's loss dict -> ObjectiveOutput
    objective.selection_kl(module, batch)            # the KL prior of the selectors `module` holds (unweighted)
    objective.flop_counter(model)                    # FLOPs of one batch, from the dense model's sizes

and does the rest (normalisation by the global token count, per-task sums, the non-finite skip, the step)
identically on every layout. A new model family registers its objective's constructor (called with the
ModelConfig) here: OBJECTIVES["lm"] = LMObjective.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from hs_scale.models.ctc import ctc_loss_sum, hybrid_loss
from hs_scale.models.seq2seq import ENCODER_TYPES
from hs_scale.training.loss import token_losses


@dataclass
class ObjectiveOutput:
    """The losses of one micro-batch.

    loss_sum: float scalar, differentiable: what backward sees (the engine divides by the global token count).
    nll_BL:   float [B, L], detached: per-token nll without smoothing, 0 at padding (per-task logging, eval).
    mask_BL:  bool [B, L]: the tokens counted (non-pad targets).
    task:     long [B] (a task per row) or [B, L] (per token): which task each token's nll is accounted to.
    ctc_sum:  float scalar, detached, or None: the CTC term (models with a CTC head).
    hits_BL:  bool [B, L] or None: argmax == target (token accuracy; only where full logits exist).
    """

    loss_sum: Tensor
    nll_BL: Tensor
    mask_BL: Tensor
    task: Tensor
    ctc_sum: Tensor | None = None
    hits_BL: Tensor | None = None

    def per_task(self, num_tasks: int) -> Tensor:
        """float [3, K]: nll sum, token count and correct-token count per task."""
        task_BL = self.task[:, None].expand_as(self.nll_BL) if self.task.dim() == 1 else self.task
        mask = self.mask_BL.float()
        hits = mask * 0 if self.hits_BL is None else self.hits_BL.float() * mask
        out = torch.zeros(3, num_tasks, device=self.nll_BL.device)
        for row, values in enumerate((self.nll_BL.float() * mask, mask, hits)):
            out[row].index_add_(0, task_BL.flatten(), values.flatten())
        return out


class Objective(Protocol):
    """What the step engine needs from a model family (see the module docstring)."""

    has_ctc: bool
    """Whether the loss has a CTC term (the engine then reports the CTC loss)."""

    def num_tokens(self, batch) -> int: ...

    def __call__(self, model: nn.Module, batch, *, label_smoothing: float,
                 with_hits: bool = False) -> ObjectiveOutput: ...

    def from_stage(self, out: dict, batch) -> ObjectiveOutput: ...

    def selection_kl(self, module: nn.Module, batch) -> Tensor: ...

    def flop_counter(self, model: nn.Module) -> Callable[[object], float]: ...


class Seq2SeqObjective:
    """Teacher-forced encoder-decoder (s2t, text): (1 - ctc_weight) x label-smoothed CE + ctc_weight x CTC.

    Batches have the fields of hs_scale.data.Batch: features + feature_lengths (speech) or source_tokens (text),
    decoder_input, target, target_lengths, src_task, tgt_task. Tokens are accounted to the decoder task.
    """

    def __init__(self, model_cfg):
        self.pad_id, self.ctc_weight = model_cfg.pad_token_id, model_cfg.ctc_weight
        self.has_ctc = self.ctc_weight > 0

    def num_tokens(self, batch) -> int:
        return int((batch.target != self.pad_id).sum())

    def __call__(self, model: nn.Module, batch, *, label_smoothing: float,
                 with_hits: bool = False) -> ObjectiveOutput:
        loss_sum, nll_BL, ctc_sum, logits = joint_loss_sum(model, batch, self.pad_id, label_smoothing,
                                                           self.ctc_weight, return_logits=True)
        hits_BL = logits.argmax(-1) == batch.target if with_hits else None
        return ObjectiveOutput(loss_sum, nll_BL, batch.target != self.pad_id, batch.tgt_task, ctc_sum, hits_BL)

    def from_stage(self, out: dict, batch) -> ObjectiveOutput:
        """The last stage's {"loss_sum", "nll_BL", "ctc_sum" (CTC head only), ...} (hs_scale.parallel.pipeline)."""
        return ObjectiveOutput(out["loss_sum"], out["nll_BL"], batch.target != self.pad_id, batch.tgt_task,
                               out.get("ctc_sum"))

    def selection_kl(self, module: nn.Module, batch) -> Tensor:
        """Sum of the KL terms of the selectors `module` holds (a whole model, a pipeline stage or a TP shard:
        the shares of all ranks sum to the single-device KL). Encoder selectors average over the source tasks."""
        total = torch.zeros(())
        for name, selector in getattr(module, "selectors", {}).items():
            total = total + selector.kl(batch.src_task if name in ENCODER_TYPES else batch.tgt_task)
        return total

    def flop_counter(self, model: nn.Module) -> Callable[[object], float]:
        """6 x params x positions (forward 2, backward 4), encoder and decoder apart, counted on the dense model
        (call before sharding). A lower bound ignoring the attention-score terms (benchmarks/train_throughput.py
        counts them too)."""
        enc = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("decoder.", "selectors.")))
        dec = sum(p.numel() for n, p in model.named_parameters() if n.startswith("decoder."))
        cfg = model.config

        def flops(batch) -> float:
            if getattr(batch, "features", None) is not None:
                src = float(cfg.subsampled_lengths(batch.feature_lengths.cpu()).sum())
            else:
                src = float(batch.source_lengths.sum())
            return 6.0 * (enc * src + dec * float(batch.target_lengths.sum()))

        return flops


def model_logits(model: nn.Module, batch, return_ctc: bool = False):
    """logits_BLV of a teacher-forced seq2seq batch, speech (features) or text (source_tokens).

    return_ctc (speech models with a CTC head): (logits_BLV, ctc_logits_BSV, encoder_lengths_B).
    """
    if getattr(batch, "features", None) is not None:
        return model(batch.features, batch.feature_lengths, batch.decoder_input, batch.src_task, batch.tgt_task,
                     **({"return_ctc": True} if return_ctc else {}))
    return model(batch.source_tokens, batch.decoder_input, batch.src_task, batch.tgt_task)


def joint_loss_sum(model: nn.Module, batch, pad_id: int, label_smoothing: float, ctc_weight: float,
                   return_logits: bool = False):
    """(loss sum to backpropagate, per-token nll [B, L], CTC loss sum or None) of one teacher-forced batch
    (+ the logits with return_logits).

    loss = (1 - ctc_weight) x label-smoothed CE + ctc_weight x CTC, both summed over the batch; the caller divides
    by the global target-token count (tokens + EOS), so both terms share one normalisation.
    """
    ctc_sum = None
    if ctc_weight <= 0:
        logits = model_logits(model, batch)
        loss_sum, nll = token_losses(logits, batch.target, pad_id, label_smoothing)
    else:
        logits, ctc_logits, enc_lengths = model_logits(model, batch, return_ctc=True)
        ce_sum, nll = token_losses(logits, batch.target, pad_id, label_smoothing)
        ctc = ctc_loss_sum(ctc_logits, enc_lengths, batch.target, batch.target_lengths, blank=pad_id)
        loss_sum, ctc_sum = hybrid_loss(ce_sum, ctc, ctc_weight), ctc.detach()
    return (loss_sum, nll, ctc_sum, logits) if return_logits else (loss_sum, nll, ctc_sum)


def _lm_objective(model_cfg) -> Objective:
    from hs_scale.training.lm_objective import LMObjective  # imports ObjectiveOutput from here

    return LMObjective(model_cfg)


OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "s2t": Seq2SeqObjective, "text": Seq2SeqObjective, "lm": _lm_objective,
}
"""model.config.arch -> the objective's constructor, called with the ModelConfig. The one registry: a new model
family adds its entry here."""


def objective_for(model_cfg) -> Objective:
    """The objective of `model_cfg.arch`, built for that config."""
    if model_cfg.arch not in OBJECTIVES:
        raise ValueError(f"model.arch={model_cfg.arch!r} has no training objective; known: {sorted(OBJECTIVES)} "
                         "(register one in hs_scale.training.objective.OBJECTIVES)")
    return OBJECTIVES[model_cfg.arch](model_cfg)
