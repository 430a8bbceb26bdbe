"""Text generation with the LM's KV cache: greedy or seeded sampling, one task per sequence.

Legend: B batch, L prompt length, V vocabulary.

Prompts of different lengths are left-padded with ``attention_mask_BL`` (1 = real token), as in transformers:
pads get their own document id (-1), so no real token attends to them and positions start at 0 at the first real
token; greedy output then equals transformers' ``generate()`` token for token (tested on exported models).
The head selection is the deterministic (evaluation) one, drawn once per call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hs_scale.models.lm.model import LMModel


@torch.no_grad()
def generate(
    model: LMModel,
    prompt_BL: Tensor,
    task_B: Tensor | None = None,
    max_new_tokens: int = 32,
    attention_mask_BL: Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    eos_token_id: int | None = -1,
    pad_token_id: int | None = None,
) -> Tensor:
    """Prompt followed by up to ``max_new_tokens`` generated tokens: long [B, L + new].

    eos_token_id: stop a sequence there (default -1: the model config's; None: never stop); finished sequences
    are filled with pad_token_id (default: the config's, else eos), and generation ends when all have finished.
    Sampling draws from softmax(logits / temperature), optionally restricted to the top_k tokens, with a
    generator seeded by ``seed`` (same seed, same tokens).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 when sampling (use do_sample=False for greedy)")
    cfg = model.config
    eos = cfg.eos_token_id if eos_token_id == -1 else eos_token_id
    pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else eos)
    B = prompt_BL.shape[0]
    device = prompt_BL.device
    docs_BL = torch.zeros_like(prompt_BL)
    if attention_mask_BL is not None:
        docs_BL = torch.where(attention_mask_BL.bool(), docs_BL, -1)
    gen = torch.Generator(device=device).manual_seed(seed) if do_sample else None

    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache()
        logits_BLV = model(prompt_BL, task_B, doc_ids_BL=docs_BL, cache=cache)
        out, done_B = [prompt_BL], torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            next_B = _pick(logits_BLV[:, -1].float(), do_sample, temperature, top_k, gen)
            if eos is not None:
                next_B = torch.where(done_B, torch.full_like(next_B, pad), next_B)
                done_B = done_B | (next_B == eos)
            out.append(next_B[:, None])
            if bool(done_B.all()) or step == max_new_tokens - 1:
                break
            logits_BLV = model(next_B[:, None], task_B, doc_ids_BL=torch.zeros_like(next_B)[:, None], cache=cache)
    finally:
        model.train(was_training)
    return torch.cat(out, dim=1)


def _pick(logits_BV: Tensor, do_sample: bool, temperature: float, top_k: int | None, gen) -> Tensor:
    if not do_sample:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV / temperature
    if top_k is not None:
        kth_B1 = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    return torch.multinomial(logits_BV.softmax(dim=-1), 1, generator=gen).squeeze(1)
