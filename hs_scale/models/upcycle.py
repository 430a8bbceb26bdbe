"""Upcycling: a dense attention model's weights as a head-selection pool (every head repeated r = H'/H times).

    model, state = upcycle_state(model_cfg, selection_cfg, dense_state_dict, num_tasks)

Used by `hs-scale import-hf` (a dense Speech2Text / M2M100 folder, ``hs_scale.export.upcycle``) and by
`train.init_from` on a dense checkpoint of ours when the new run selects heads (``hs_scale.training.resume``).
At initialisation, in eval mode, every task computes the dense model's function: the pool's group g holds only
copies of dense head g, and phi is high on the first copy of each group, so the deterministic selection picks
exactly the original heads in their original order. Training draws Gumbel noise around phi, so copies get picked
by some tasks and not others and diverge (sparse upcycling, Komatsuzaki et al. 2022, applied to heads).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hs_scale.models import build_model
from hs_scale.models.config import ModelConfig
from hs_scale.selection.config import SelectionConfig
from hs_scale.selection.sites import SITES


def pool_from_dense(weight: Tensor, bias: Tensor | None, head_dim: int, r: int, perturb_std: float,
                    gen: torch.Generator):
    """[H*d, D] -> [H*r*d, D] (and bias): each head's rows repeated r times, copies after the first perturbed."""
    D = weight.shape[1]
    w_HrdD = weight.view(-1, 1, head_dim, D).repeat(1, r, 1, 1).clone()
    b_Hrd = None if bias is None else bias.view(-1, 1, head_dim).repeat(1, r, 1).clone()
    if perturb_std > 0 and r > 1:
        w_HrdD[:, 1:] += perturb_std * torch.randn(w_HrdD[:, 1:].shape, generator=gen)
    return w_HrdD.reshape(-1, D), None if b_Hrd is None else b_Hrd.reshape(-1)


def initial_logits(num_tasks: int, layers: int, pool_heads: int, r: int, selection: SelectionConfig) -> Tensor:
    """phi [K, L, P]: high on the first copy of each dense head, low elsewhere (see the module docstring)."""
    low, high = selection.init_low, selection.init_high
    if low >= high:
        low = high - 1.0  # degenerate init range: keep a margin so the originals are still picked
    logits = torch.full((num_tasks, layers, pool_heads), low)
    logits[:, :, ::r] = high
    return logits


@torch.no_grad()
def upcycle_state(model_cfg: ModelConfig, selection: SelectionConfig, dense: dict[str, Tensor], num_tasks: int,
                  perturb_std: float = 0.0, seed: int = 0):
    """(pooled model, its state dict) from our dense state dict ``dense``."""
    H, P = model_cfg.num_heads, selection.pool_heads
    if selection.enabled and P % H:
        raise ValueError(f"pool size {P} is not a multiple of the dense model's {H} heads; upcycling repeats each "
                         f"head H'/H times, so use a pool size in {[H * k for k in (2, 3, 4)]}")
    r = P // H if selection.enabled else 1
    model = build_model(model_cfg, selection, num_tasks).eval()
    state = model.state_dict()
    missing = [k for k in state if not k.startswith("selectors.") and k not in dense]
    if missing:
        raise ValueError(f"dense state lacks {missing[:3]}")
    for k in state:
        if not k.startswith("selectors."):
            state[k] = dense[k]
    gen = torch.Generator().manual_seed(seed)
    for attn_type in selection.selected_types():
        layers = SITES[attn_type].num_layers(model_cfg)
        for layer in range(layers):
            prefix = SITES[attn_type].prefix(layer)
            for proj in ("q_proj", "k_proj", "v_proj"):
                w, b = pool_from_dense(dense[f"{prefix}.{proj}.weight"], dense.get(f"{prefix}.{proj}.bias"),
                                       model_cfg.head_dim, r, perturb_std, gen)
                state[f"{prefix}.{proj}.weight"], state[f"{prefix}.{proj}.bias"] = w, b
        state[f"selectors.{attn_type}.logits"] = initial_logits(num_tasks, layers, P, r, selection)
    model.load_state_dict(state, strict=True)
    return model, model.state_dict()
