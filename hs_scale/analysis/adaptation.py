"""Soft head-mask adaptation (LAHIS section 4): train only the mask entries of the top heads of a frozen model.

The model's weights never change. The mask m [L, H] is 1 everywhere except the chosen entries (the top
``fraction`` of heads by a language's LAHIS matrix, 2% in the paper), which are free parameters (init 1,
unconstrained) trained with AdamW. Only those entries exist as parameters, so weight decay touches nothing else
(the reference code decays the whole mask, shrinking untrained entries to ~0.96).

An example is (token ids, prompt length P): the loss is the next-token cross-entropy on tokens P.. (the answer);
P <= 1 trains on every token of a plain document.
Legend: L layers, H query heads, D head dim, T tokens.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from hs_scale.analysis.lahis import HeadMask, decoder_layers, frozen, head_shape

Example = tuple[Sequence[int], int]


def choose_heads(scores_LH: torch.Tensor, fraction: float = 0.02) -> list[tuple[int, int]]:
    """The round(fraction x L x H) highest-scoring (layer, head) pairs (at least one), highest first."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    L, H = scores_LH.shape
    n = max(1, round(fraction * L * H))
    order = torch.argsort(scores_LH.double().flatten(), descending=True)[:n]
    return [(int(k) // H, int(k) % H) for k in order]


def _mask(theta: torch.Tensor, heads: Sequence[tuple[int, int]], L: int, H: int) -> torch.Tensor:
    """fp32 [L, H]: ones, with theta[j] at heads[j] (differentiable in theta only)."""
    idx = torch.tensor(heads, dtype=torch.long).reshape(-1, 2)
    return torch.ones(L, H, device=theta.device).index_put((idx[:, 0], idx[:, 1]), theta)


def _example_loss(model, ids: Sequence[int], prompt_len: int, max_tokens: int) -> tuple[torch.Tensor, int]:
    """Summed answer-token cross-entropy of one example and its number of answer tokens."""
    ids_T = torch.tensor(list(ids[:max_tokens]), dtype=torch.long, device=next(model.parameters()).device)
    logits = model(input_ids=ids_T[None]).logits[0, :-1].float()
    start = max(prompt_len, 1) - 1  # logits[t] predicts ids[t + 1]
    return F.cross_entropy(logits[start:], ids_T[start + 1:], reduction="sum"), len(ids_T) - 1 - start


def _usable(examples: Sequence[Example], max_tokens: int, what: str) -> list[Example]:
    kept = [(ids, p) for ids, p in examples if min(len(ids), max_tokens) > max(p, 1)]
    if not kept:
        raise ValueError(f"{what}: no example has an answer token within max_tokens={max_tokens}")
    return kept


@torch.no_grad()
def task_loss(model: torch.nn.Module, examples: Sequence[Example], mask: torch.Tensor | None = None,
              max_tokens: int = 2048) -> float:
    """Answer-token-weighted mean cross-entropy over examples with head mask ``mask`` [L, H] (None: all ones)."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with HeadMask(model, mask):
        for ids, p in _usable(examples, max_tokens, "task_loss"):
            loss, n = _example_loss(model, ids, p, max_tokens)
            total, count = total + float(loss), count + n
    model.train(was_training)
    return total / count


def adapt_mask(model: torch.nn.Module, scores_LH: torch.Tensor, train: Sequence[Example], fraction: float = 0.02,
               lr: float = 1e-2, epochs: int = 2, weight_decay: float = 0.01, max_tokens: int = 2048,
               seed: int = 0) -> dict[str, object]:
    """Train the chosen heads' mask entries, batch 1, AdamW; returns ``mask`` fp32 [L, H], ``heads``, ``losses``.

    ``losses`` is the mean training loss of each epoch (per example, as trained).
    """
    L, H, _ = head_shape(model)
    heads = choose_heads(scores_LH, fraction)
    train = _usable(train, max_tokens, "adapt_mask train set")
    device = next(model.parameters()).device
    theta = torch.ones(len(heads), device=device, requires_grad=True)
    opt = torch.optim.AdamW([theta], lr=lr, weight_decay=weight_decay)
    rng = random.Random(seed)
    losses = []
    was_training = model.training
    model.eval()  # no dropout: only the mask learns
    with frozen(model), HeadMask(model) as hm:
        for _ in range(epochs):
            order = list(range(len(train)))
            rng.shuffle(order)
            total = 0.0
            for j in order:
                hm.mask = _mask(theta, heads, L, H)
                loss_sum, n = _example_loss(model, train[j][0], train[j][1], max_tokens)
                loss = loss_sum / n
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach())
            losses.append(total / len(train))
    model.train(was_training)
    return {"mask": _mask(theta.detach(), heads, L, H).cpu(), "heads": heads, "losses": losses}


def save_mask(path: str, mask_LH: torch.Tensor, heads: Sequence[tuple[int, int]] = ()) -> None:
    """Write the mask (fp32 [L, H]) as safetensors, the trained heads in the metadata."""
    save_file({"mask": mask_LH.float().contiguous().cpu()}, path,
              metadata={"format": "hs_scale.head_mask", "heads": json.dumps([list(h) for h in heads])})


def load_mask(path: str) -> torch.Tensor:
    """fp32 [L, H] mask written by save_mask."""
    tensors = load_file(path)
    if "mask" not in tensors:
        raise ValueError(f"{path}: no 'mask' tensor; write it with hs_scale.analysis.adaptation.save_mask")
    return tensors["mask"]


@torch.no_grad()
def fold_mask(model: torch.nn.Module, mask_LH: torch.Tensor) -> torch.nn.Module:
    """Scale each head's o_proj input columns by its mask entry, in place: a plain model that needs no hook.

    Same outputs as running under ``HeadMask(model, mask_LH)`` (o_proj is linear; its bias is not scaled).
    """
    L, H, D = head_shape(model)
    if tuple(mask_LH.shape) != (L, H):
        raise ValueError(f"mask has shape {tuple(mask_LH.shape)}, the model has {L} layers x {H} heads")
    for i, layer in enumerate(decoder_layers(model)):
        w = layer.self_attn.o_proj.weight
        w.mul_(mask_LH[i].repeat_interleave(D).to(device=w.device, dtype=w.dtype)[None, :])
    return model
