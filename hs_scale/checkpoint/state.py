"""Model / optimizer / RNG state <-> the flat, layout-free DCP state dict of a checkpoint.

Keys are the single-device state-dict names (GLOBAL layer indices; pipeline chunks use them too, see
hs_scale/parallel/pipeline.py), so any TP x PP x DP layout reads any other's checkpoint:

    model.<name>                         parameters and persistent buffers (selector `draws`, `temperature`)
    model.<name>.layer_<g>               selector logits phi [K, L, P] are stored one global layer g at a time
                                         ([K, P]): a pipeline stage holds only its layers' rows and finds them
                                         by name, whatever the stage boundaries were when they were saved
    optim.<state>.<model key>            AdamW exp_avg / exp_avg_sq: per *parameter name* (never index),
                                         cut exactly like the parameter
    optim.<state>.<name>                 states not shaped like the parameter (AdamW's scalar `step`)

A TP-sharded tensor (megatron's `tensor_model_parallel` / `partition_dim`) is saved as
`DTensor.from_local(shard, tp_mesh, [Shard(dim)])`: DCP records its global shape and every shard's offsets,
and a reader in another layout asks for the region it owns. Replicated tensors are plain tensors; DCP keeps
one copy of every (key, offset) whatever the number of ranks that hold it (DP replicas, TP ranks, pipeline
chunks sharing the embedding). Tied parameters (one tensor under several names) are saved under each name
and loaded from whichever the checkpoint has.

Padded dimensions (the vocab-parallel embedding has padded_vocab_size(V, t) rows, which depends on t): when
the saved global size differs from this layout's, the rank reads the whole saved tensor and copies the
overlap, zero-filling the rest (padding rows are zero and never used).
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hs_scale.selection.selector import HeadSelector


@dataclass
class Entry:
    """One DCP key of this rank: a view into live state, sharded along `shard_dim` over the TP group or not."""

    key: str
    local: Tensor
    shard_dim: int | None


@dataclass
class TPContext:
    """The TP group a rank's shards are spread over (size 1 = nothing sharded)."""

    rank: int = 0
    size: int = 1
    mesh: object = None  # DeviceMesh over the TP group, built lazily by the manager


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / DeepSpeed / megatron wrappers, whose parameter names carry no `module.` prefix."""
    while isinstance(getattr(model, "module", None), nn.Module) and all(
        n.startswith("module.") for n, _ in model.named_parameters()
    ):
        model = model.module
    return model


def modules_of(model: nn.Module | list[nn.Module]) -> list[nn.Module]:
    """A model, or the list of pipeline chunks a rank holds (interleaved schedules give several), unwrapped."""
    return [unwrap(m) for m in (model if isinstance(model, (list, tuple)) else [model])]


def _layer_offsets(model: nn.Module | list[nn.Module]) -> dict[int, int]:
    """{id(selector logits): global index of its row 0 along dim 1} (phi [K, L, P]).

    Keyed by tensor, not by name: a rank holding several chunks of an interleaved pipeline has one
    `selector.logits` (LM) or `selectors.<site>.logits` per chunk, each with its own first layer."""
    return {
        id(module.logits): getattr(module.logits, "layer_offset", module.first_layer)
        for m in modules_of(model)
        for module in m.modules()
        if isinstance(module, HeadSelector)
    }


def _entries(key: str, tensor: Tensor, param: Tensor | None, layer_offset: int | None, tp: TPContext) -> list[Entry]:
    """Split one tensor into its DCP entries. Only tensors shaped like their parameter are cut like it."""
    like_param = param is not None and tensor.shape == param.shape
    shard_dim = None
    if like_param and tp.size > 1 and getattr(param, "tensor_model_parallel", False):
        shard_dim = param.partition_dim
    if not (like_param and layer_offset is not None):
        return [Entry(key, tensor, shard_dim)]
    # Layer-split: dim 1 disappears, so a shard dim after it moves down by one.
    dim = None if shard_dim is None else shard_dim - (shard_dim > 1)
    return [Entry(f"{key}.layer_{layer_offset + i:04d}", tensor.select(1, i), dim) for i in range(tensor.shape[1])]


def _aliases(model: nn.Module | list[nn.Module]) -> dict[int, list[str]]:
    """{id(tensor): every state-dict name of it} (tied weights have several)."""
    out: dict[int, list[str]] = {}
    for name, t in (item for m in modules_of(model) for item in m.state_dict(keep_vars=True).items()):
        if isinstance(t, Tensor):  # megatron adds `_extra_state` = None entries
            out.setdefault(id(t), []).append(name)
    return out


def model_entries(model: nn.Module, tp: TPContext) -> list[list[Entry]]:
    """Per live tensor, its entries under each alias name: [[entries of name 1], [entries of name 2], ...]."""
    mods = modules_of(model)
    offsets = _layer_offsets(mods)
    params = {id(p): p for m in mods for p in m.parameters()}
    tensors = {id(t): t for m in mods for t in m.state_dict(keep_vars=True).values() if isinstance(t, Tensor)}
    groups = []
    for tid, names in _aliases(model).items():
        t = tensors[tid].detach()
        groups.append([_entries(f"model.{n}", t, params.get(tid), offsets.get(tid), tp) for n in names])
    return groups


def optimizer_entries(optimizer: torch.optim.Optimizer, model: nn.Module, tp: TPContext) -> list[list[Entry]]:
    """Entries of every existing optimizer state tensor, keyed by parameter name (see module docstring)."""
    offsets, aliases = _layer_offsets(model), _aliases(model)
    groups = []
    for p in (p for g in optimizer.param_groups for p in g["params"]):
        names = _param_names(p, aliases)
        for state_name, value in optimizer.state.get(p, {}).items():
            if isinstance(value, Tensor):
                groups.append(
                    [_entries(f"optim.{state_name}.{n}", value.detach(), p, offsets.get(id(p)), tp) for n in names]
                )
    return groups


def _param_names(p: Tensor, aliases: dict[int, list[str]]) -> list[str]:
    if id(p) not in aliases:
        raise ValueError("the optimizer holds a parameter that is not in the model: pass the model it optimizes")
    return aliases[id(p)]


def save_dict(groups: list[list[Entry]], tp: TPContext) -> dict[str, Tensor]:
    """The DCP state dict of the given entries (contiguous copies; TP shards as DTensors)."""
    out = {}
    for per_alias in groups:
        for entries in per_alias:
            for e in entries:
                out[e.key] = _wrap(e.local.contiguous(), e.shard_dim, tp)
    return out


def _wrap(local: Tensor, shard_dim: int | None, tp: TPContext) -> Tensor:
    if shard_dim is None:
        return local
    from torch.distributed.tensor import DTensor, Shard

    return DTensor.from_local(local, tp.mesh, [Shard(shard_dim)], run_check=False)


# ---------------------------------------------------------------------------------------------------------------
# Loading: targets allocated from the checkpoint's metadata, read by DCP, then copied into live tensors


class Loader:
    """Collects the DCP targets of this rank, then copies what DCP read into the live tensors."""

    def __init__(self, metadata, tp: TPContext):
        self.md, self.tp = metadata.state_dict_metadata, tp
        self.targets: dict[str, Tensor] = {}
        self._copies: list[tuple[Entry, str]] = []

    def has(self, entries: list[Entry]) -> bool:
        return all(e.key in self.md for e in entries)

    def want(self, entries: list[Entry]) -> None:
        for e in entries:
            saved = tuple(self.md[e.key].size)
            shape = list(e.local.shape)
            if e.shard_dim is not None:
                shape[e.shard_dim] *= self.tp.size
            if len(saved) != len(shape):
                raise ValueError(f"checkpoint tensor {e.key} has shape {saved}, this model needs {tuple(shape)}")
            if saved == tuple(shape):
                target = _wrap(torch.empty_like(e.local, memory_format=torch.contiguous_format), e.shard_dim, self.tp)
            else:  # padded dim (vocabulary): read the whole saved tensor, copy the overlap (module docstring)
                target = torch.empty(saved, dtype=self.md[e.key].properties.dtype)
            self.targets[e.key] = target
            self._copies.append((e, e.key))

    @torch.no_grad()
    def apply(self) -> None:
        for e, key in self._copies:
            got = self.targets[key]
            if hasattr(got, "to_local"):
                e.local.copy_(got.to_local())
            else:
                _copy_global(e, got, self.tp)


def _copy_global(e: Entry, got: Tensor, tp: TPContext) -> None:
    """Copy this rank's region of the global tensor `got` into e.local (padded dims: overlap, rest zero)."""
    if got.shape == e.local.shape and e.shard_dim is None:
        e.local.copy_(got)
        return
    e.local.zero_()
    dst, src = [], []
    for d, (n_local, n_saved) in enumerate(zip(e.local.shape, got.shape, strict=True)):
        start = tp.rank * n_local if d == e.shard_dim else 0
        n = max(0, min(n_local, n_saved - start))
        dst.append(slice(0, n))
        src.append(slice(start, start + n))
    e.local[tuple(dst)].copy_(got[tuple(src)])


@torch.no_grad()
def load_full(model: nn.Module | list[nn.Module], full: dict[str, Tensor], tp: TPContext) -> None:
    """Copy a single-device state dict (an import-hf model, load_full_model_state) into a model of any TP x PP
    layout: each rank takes its TP shard and its pipeline stage's layers, exactly as from a checkpoint."""
    flat = {f"model.{name}": t for name, t in full.items()}
    aliases = _aliases(model)
    for name in (n for tid in _layer_offsets(model) for n in aliases.get(tid, [])):
        if name in full:  # selector logits [K, L, P] are addressed one global layer at a time
            flat.update({f"model.{name}.layer_{g:04d}": full[name].select(1, g) for g in range(full[name].shape[1])})
    missing = []
    for per_alias in model_entries(model, tp):
        found = next((es for es in per_alias if all(e.key in flat for e in es)), None)
        if found is None:
            missing.append(per_alias[0][0].key)
            continue
        for e in found:
            want = list(e.local.shape)
            if e.shard_dim is not None:
                want[e.shard_dim] *= tp.size
            if flat[e.key].dim() != len(want):
                raise ValueError(f"weights {e.key} have shape {tuple(flat[e.key].shape)}, this model needs "
                                 f"{tuple(want)}")
            _copy_global(e, flat[e.key].to(e.local.dtype), tp)
    if missing:
        raise KeyError(f"the weights lack {len(missing)} model tensors, e.g. {missing[:5]}: saved from another model?")


def want_model(loader: Loader, model: nn.Module) -> None:
    """Ask for every model tensor (any alias name present in the checkpoint); raise naming what is missing."""
    missing = []
    for per_alias in model_entries(model, loader.tp):
        found = next((entries for entries in per_alias if loader.has(entries)), None)
        if found is None:
            missing.append(per_alias[0][0].key)
        else:
            loader.want(found)
    if missing:
        raise KeyError(
            f"checkpoint lacks {len(missing)} model tensors, e.g. {missing[:5]}: was it saved from this model?"
        )


def want_optimizer(loader: Loader, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[int, dict[str, Tensor]]:
    """Allocate this rank's optimizer state from the checkpoint (keyed by name) and ask DCP for it.

    Returns {index in optimizer order: {state name: tensor}} to give to `optimizer.load_state_dict` once read.
    """
    offsets, aliases = _layer_offsets(model), _aliases(model)
    state_names = sorted({k.split(".")[1] for k in loader.md if k.startswith("optim.")})
    state: dict[int, dict[str, Tensor]] = {}
    for index, p in enumerate(p for g in optimizer.param_groups for p in g["params"]):
        for s in state_names:
            for n in _param_names(p, aliases):
                buf = _alloc(loader, s, n, p, offsets.get(id(p)))
                if buf is not None:
                    state.setdefault(index, {})[s] = buf
                    break
    return state


def _alloc(loader: Loader, s: str, name: str, p: Tensor, layer_offset: int | None) -> Tensor | None:
    """A buffer for state `s` of parameter `name` if the checkpoint has it (and ask DCP for it), else None."""
    key = f"optim.{s}.{name}"
    whole = key in loader.md and len(loader.md[key].size) != p.dim()
    if not whole:
        like = torch.empty_like(p.detach(), memory_format=torch.contiguous_format)
        entries = _entries(key, like, p, layer_offset, loader.tp)
        if loader.has(entries):
            loader.want(entries)
            return like
    if key in loader.md:  # not shaped like the parameter (AdamW's scalar step): replicated, read whole
        meta = loader.md[key]
        buf = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        loader.want([Entry(key, buf, None)])
        return buf
    return None


# ---------------------------------------------------------------------------------------------------------------
# Consolidation (one process): full tensors under the single-device names


def consolidate(metadata, prefix: str = "model.") -> tuple[dict[str, Tensor], dict[str, list[tuple[int, str]]]]:
    """Targets for every `prefix` tensor at its saved global shape, and the layer-split keys to stack."""
    targets, stacks = {}, {}
    for key, meta in metadata.state_dict_metadata.items():
        if not key.startswith(prefix):
            continue
        targets[key] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        name, _, layer = key[len(prefix) :].rpartition(".layer_")
        if name and layer.isdigit():
            stacks.setdefault(name, []).append((int(layer), key))
    return targets, stacks


def stack_layers(
    targets: dict[str, Tensor], stacks: dict[str, list[tuple[int, str]]], prefix: str
) -> dict[str, Tensor]:
    """{single-device name: tensor}: layer-split selector logits stacked back into phi [K, L, P]."""
    split = {key for rows in stacks.values() for _, key in rows}
    out = {k[len(prefix) :]: v for k, v in targets.items() if k not in split}
    for name, rows in stacks.items():
        rows.sort()
        layers = [g for g, _ in rows]
        if layers != list(range(len(layers))):
            raise ValueError(f"checkpoint holds layers {layers} of {name}: not a complete set 0..L-1")
        out[name] = torch.stack([targets[k] for _, k in rows], dim=1)
    return out


# ---------------------------------------------------------------------------------------------------------------
# RNG states of one rank


def rng_state() -> dict:
    """Python, numpy, torch CPU, CUDA (if present) and megatron's model-parallel tracker states."""
    state: dict = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if "numpy" in sys.modules:
        state["numpy"] = sys.modules["numpy"].random.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    tracker = _megatron_tracker()
    if tracker is not None and tracker.get_states():
        state["megatron"] = {k: v.clone() for k, v in tracker.get_states().items()}
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    tracker = _megatron_tracker()
    if "megatron" in state and tracker is not None:
        tracker.set_states(state["megatron"])


def _megatron_tracker():
    # Only if the run already uses megatron: importing it costs seconds.
    module = sys.modules.get("megatron.core.tensor_parallel.random")
    return None if module is None else module.get_cuda_rng_tracker()
