"""DeepSpeed ZeRO 1/2 optimizer state, seen per model parameter: what hs_scale.checkpoint saves and loads.

ZeRO 1/2 replaces the params of the client torch optimizer with one flat fp32 partition per param group (this
rank's slice of the group's parameters, plus alignment padding), so `optimizer.state` is keyed by tensors the model
does not have. The checkpoint format is layout-free (hs_scale/checkpoint/state.py: AdamW state per parameter *name*,
full tensors), which any engine and any data-parallel size reads. `ZeroCheckpointOptimizer` presents the ZeRO
optimizer that way:

    param_groups      [{client group i's hyper-parameters (live: lr follows the scheduler), "params": the model
                       parameters of group i}]                                          (no communication)
    state             {model param: {"exp_avg": full fp32, "exp_avg_sq": full fp32, "step": 0-d tensor}}, gathered
                       with deepspeed.utils.safe_get_full_optimizer_state (one all-reduce over the dp group per
                       parameter and state): a COLLECTIVE on first read after a step or a load - every dp rank reads
                       it, in the same order (CheckpointManager.save does, on every rank). Cached until the next
                       step (`release()` frees it earlier).
    load_state_dict   torch's {"state": {index: {...}}, "param_groups": [...]} with indices in param_groups order
                       (what CheckpointManager.load passes): writes this rank's fragment of every full tensor
                       (safe_set_full_optimizer_state), the shared `step`, the hyper-parameters, and refreshes the
                       fp32 master partition from the model weights, which the manager has just loaded. No
                       communication.

Why the fp32 master weights are not saved: the checkpoint holds the model parameters, which for fp32 parameters
ARE the master weights bit for bit (ZeRO copies the updated partition back into them every step), so restoring the
master from them is exact. With parallel.bf16 the model parameters are bf16 and the master is rounded on resume
(see the limitations in hs_scale.training.engine).

DeepSpeed 0.19 links a parameter's optimizer-state fragments lazily after the first optimizer step of group 0 only,
so the parameters of later groups (hs_scale's no-decay group) are left unlinked and safe_get_full_optimizer_state
fails for them; every read and write here relinks all groups first (deepspeed.utils.lazy_init_hp_params_optimizer_state,
no communication).

ZeRO stage 0 needs none of this: DeepSpeed steps the client optimizer on the model's own parameters
(`checkpoint_optimizer` returns it unchanged).
"""

from __future__ import annotations

import torch
from torch import Tensor


def is_zero_partitioned(optimizer) -> bool:
    """True for DeepSpeed's ZeRO 1/2 optimizer (flat fp32 partitions), False for a plain torch optimizer."""
    return hasattr(optimizer, "single_partition_of_fp32_groups") and hasattr(optimizer, "bit16_groups")


def checkpoint_optimizer(ds_engine):
    """What to give hs_scale.checkpoint for a DeepSpeed engine: a ZeroCheckpointOptimizer for ZeRO 1/2, else the
    engine's optimizer (ZeRO 0: the client torch optimizer, which holds the model's parameters)."""
    optimizer = ds_engine.optimizer
    if is_zero_partitioned(optimizer):
        return ZeroCheckpointOptimizer(optimizer)
    if hasattr(optimizer, "param_groups") and hasattr(optimizer, "state") and not hasattr(optimizer, "optimizer"):
        return optimizer
    raise TypeError(
        f"cannot checkpoint DeepSpeed optimizer {type(optimizer).__name__}: hs_scale supports ZeRO 0/1/2 with a client "
        "torch optimizer (parallel.zero_stage 0, 1 or 2)"
    )


class ZeroCheckpointOptimizer:
    """A ZeRO 1/2 optimizer as a torch-optimizer-shaped object keyed by model parameters (module docstring)."""

    def __init__(self, zero_optimizer):
        if not is_zero_partitioned(zero_optimizer):
            raise TypeError(f"{type(zero_optimizer).__name__} is not a DeepSpeed ZeRO 1/2 optimizer")
        self.zero = zero_optimizer
        self.client: torch.optim.Optimizer = zero_optimizer.optimizer
        # bit16_groups[i]: the trainable model parameters of client group i, in the client's order.
        self._params: list[list[Tensor]] = [list(g) for g in zero_optimizer.bit16_groups]
        self._flat: list[Tensor] = list(zero_optimizer.single_partition_of_fp32_groups)
        if len(self._params) != len(self.client.param_groups):
            raise ValueError("DeepSpeed ZeRO optimizer and its client optimizer disagree on the number of param groups")
        self._cache: dict | None = None
        self._cache_key = None
        self._loads = 0

    # --------------------------------------------------------------------------------------------- torch-like view
    @property
    def param_groups(self) -> list[dict]:
        return [
            {**{k: v for k, v in group.items() if k != "params"}, "params": params}
            for group, params in zip(self.client.param_groups, self._params, strict=True)
        ]

    @property
    def defaults(self) -> dict:
        return self.client.defaults

    @property
    def state(self) -> dict[Tensor, dict[str, Tensor]]:
        """Full per-parameter state (a collective over the dp group when not cached: see module docstring)."""
        key = self._key()
        if self._cache is None or self._cache_key != key:
            self._cache = None  # free the old copy before gathering the new one
            self._cache, self._cache_key = self._gather(), key
        return self._cache

    def release(self) -> None:
        """Drop the gathered full state (2 x the model in fp32 for AdamW); the next `state` read gathers again."""
        self._cache = self._cache_key = None

    def state_dict(self) -> dict:
        """torch's format (state by index in param_groups order), full tensors; a collective like `state`."""
        full, out, index = self.state, {}, 0
        groups = []
        for group in self.param_groups:
            ids = []
            for p in group["params"]:
                if p in full:
                    out[index] = full[p]
                ids.append(index)
                index += 1
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        return {"state": out, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore from torch's format (full tensors by index in param_groups order; module docstring)."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if len(saved_groups) != len(self._params):
            raise ValueError(
                f"the state has {len(saved_groups)} param groups, this ZeRO optimizer has {len(self._params)}: build "
                "the optimizer the same way as the saving run"
            )
        per_param: list[list[dict | None]] = []
        for g, (saved, params) in enumerate(zip(saved_groups, self._params, strict=True)):
            if len(saved["params"]) != len(params):
                raise ValueError(
                    f"param group {g}: the state has {len(saved['params'])} parameters, this optimizer has "
                    f"{len(params)}"
                )
            per_param.append([saved_state.get(i) for i in saved["params"]])

        for group, saved in zip(self.client.param_groups, saved_groups, strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})  # as torch's load_state_dict does

        for g, (params, flat, states) in enumerate(zip(self._params, self._flat, per_param, strict=True)):
            present = [s for s in states if s]
            if not present:  # never stepped: exactly a fresh torch optimizer (it initialises its state lazily)
                self.client.state.pop(flat, None)
                continue
            names = {k for s in present for k in s}
            fields = {k for k in names if _like_param(k, params, states)}
            scalars = names - fields
            group_state: dict = {k: torch.zeros_like(flat) for k in sorted(fields)}
            for k in sorted(scalars):
                values = [s[k] for s in present if k in s]
                if any(not _same(values[0], v) for v in values[1:]):
                    raise ValueError(
                        f"param group {g}: parameters have different optimizer `{k}` values; ZeRO keeps one per group"
                    )
                group_state[k] = values[0].detach().clone() if isinstance(values[0], Tensor) else values[0]
            self.client.state[flat] = group_state
            self._link_group(g)
            for p, s in zip(params, states, strict=True):
                for k in fields & set(s or {}):
                    safe_set_full_optimizer_state(p, s[k].detach().to(flat.dtype), k)

        # fp32 master partition <- the model weights the checkpoint manager has just loaded (exact for fp32)
        for params in self._params:
            for p in params:
                safe_set_full_fp32_param(p, p.detach().to(torch.float32))
        self._loads += 1
        self.release()

    # --------------------------------------------------------------------------------------------- internals
    def _key(self):
        """Changes when the state does, identically on every dp rank (step counts move together; loads are
        collective), so all ranks agree on whether `state` gathers - a rank-local test could deadlock."""
        steps = []
        for flat in self._flat:
            st = self.client.state.get(flat)
            step = None if not st else st.get("step")
            steps.append(float(step) if step is not None else None)
        return self._loads, tuple(steps)

    def _link_group(self, g: int) -> None:
        from deepspeed.utils import lazy_init_hp_params_optimizer_state

        lazy_init_hp_params_optimizer_state(self._params[g], self._flat[g], self.client.state)

    def _gather(self) -> dict[Tensor, dict[str, Tensor]]:
        from deepspeed.utils import safe_get_full_optimizer_state

        out: dict[Tensor, dict[str, Tensor]] = {}
        for g, (params, flat) in enumerate(zip(self._params, self._flat, strict=True)):
            st = self.client.state.get(flat)
            if not st:  # before the first step: no state, as in a torch optimizer
                continue
            self._link_group(g)
            fields = sorted(k for k, v in st.items() if isinstance(v, Tensor) and v.shape == flat.shape)
            shared = {k: v for k, v in st.items() if k not in fields}  # AdamW's `step`: one per group
            for p in params:
                full = {}
                for k in fields:
                    value = safe_get_full_optimizer_state(p, k)
                    if value is None:
                        raise RuntimeError(f"DeepSpeed returned no `{k}` for a parameter of group {g}")
                    full[k] = value
                out[p] = {**shared, **full}
        return out


def _like_param(key: str, params: list[Tensor], states: list[dict | None]) -> bool:
    """Whether state `key` is shaped like its parameter (exp_avg...) rather than one value per group (step)."""
    values = [(p, s[key]) for p, s in zip(params, states, strict=True) if s and key in s]
    return all(isinstance(v, Tensor) and v.dim() > 0 and v.shape == p.shape for p, v in values)


def _same(a, b) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    return a == b
