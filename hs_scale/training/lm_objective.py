"""The decoder-only LM's training objective (model.arch == "lm"): next-token cross-entropy of a packed batch.

Legend: B rows, L tokens per row, V vocabulary, K tasks.

The batch is a packed hs_scale.data.packing.LMBatch: every token has its document's task id, positions restart
per document and attention stays inside a document (doc_ids). The loss is next-token cross-entropy summed over
the tokens that have a target (IGNORE_INDEX at document ends and padding), optionally label-smoothed; the step
engine divides it by the global token count, so the step minimises the token mean over the global batch, as for
the encoder-decoders. Per-task sums account each token's nll to its own document's task (a row may mix
languages). Registered as OBJECTIVES["lm"] (hs_scale.training.objective); the step engine is the one every
model family uses. Under tensor / pipeline parallelism the last stage (hs_scale.parallel.lm_pipeline) computes the
same sums with the vocab-parallel cross-entropy, and `from_stage` reads them.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from hs_scale.data.packing import IGNORE_INDEX, LMBatch
from hs_scale.training.loss import token_losses
from hs_scale.training.objective import ObjectiveOutput


class LMObjective:
    """Next-token cross-entropy of a packed LMBatch on hs_scale.models.lm.LMModel."""

    has_ctc = False

    def __init__(self, model_cfg=None):
        del model_cfg  # nothing in the LM objective depends on the model's config

    def num_tokens(self, batch: LMBatch) -> int:
        return batch.num_tokens

    def __call__(self, model: nn.Module, batch: LMBatch, *, label_smoothing: float,
                 with_hits: bool = False) -> ObjectiveOutput:
        logits_BLV = model(batch.input_ids, task_BL=batch.task_ids, position_ids_BL=batch.position_ids,
                           doc_ids_BL=batch.doc_ids)
        loss_sum, nll_BL = token_losses(logits_BLV, batch.targets, IGNORE_INDEX, label_smoothing)
        hits_BL = logits_BLV.argmax(-1) == batch.targets if with_hits else None
        return ObjectiveOutput(loss_sum, nll_BL, batch.targets != IGNORE_INDEX, batch.task_ids, hits_BL=hits_BL)

    def from_stage(self, out: dict, batch: LMBatch) -> ObjectiveOutput:
        """The last stage's {"loss_sum", "nll_BL", "tokens"} (hs_scale.parallel.lm_pipeline.LMPipelineChunk)."""
        return ObjectiveOutput(out["loss_sum"], out["nll_BL"], batch.targets != IGNORE_INDEX, batch.task_ids)

    def selection_kl(self, module: nn.Module, batch: LMBatch) -> Tensor:
        """The selector's KL prior averaged over the tasks with a target in this batch (unweighted); `module` is
        the model or a pipeline / TP chunk of it (its selector slice's share)."""
        return module.selection_kl(batch.task_ids[batch.targets != IGNORE_INDEX])

    def flop_counter(self, model: nn.Module) -> Callable[[LMBatch], float]:
        """6 x params x positions (forward 2, backward 4), selector logits left out: a lower bound ignoring the
        attention-score terms, as for the encoder-decoders."""
        params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("selector."))
        return lambda batch: 6.0 * params * float(batch.input_ids.numel())
