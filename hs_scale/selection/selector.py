"""The head selector: per-task logits phi over a pool of heads, and the heads they pick.

Legend: K tasks, L layers, P = H' pool heads, H active heads (slots), r = P / H heads per group.

Gong et al. 2021, section 3. Each (task k, layer l) owns logits phi[k, l, :] over the P pool heads.
Training draws, once per forward, a two-class Gumbel-softmax relaxation

    s = sigmoid((phi + g1 - g2) / tau),   g1, g2 ~ Gumbel(0, 1)

and keeps H heads:
  * group:  slot g takes argmax of s over pool heads [g*r, (g+1)*r)   (contiguous groups, stable slot order)
  * subset: the H largest s, slotted in ascending head order (the reference code slots them by noisy value,
            which feeds a head to different output-projection columns from step to step).
Each kept head gets the straight-through weight w = s - s.detach() + 1: exactly 1 in value, ds in gradient, so
dL/dphi carries <dL/d out_h, out_h>, the same quantity as the Michel et al. and LAHIS head-importance scores.
Evaluation and inference are deterministic: the same rule applied to phi itself (no noise).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hs_scale.selection.config import head_problems

_MASK64 = (1 << 64) - 1


@dataclass
class HeadChoice:
    """Heads picked for one attention layer, for every task.

    heads:   long  [K, H]  pool-head index feeding each slot
    weights: float [K, H]  straight-through slot weights (value 1, gradient into phi)
    """

    heads: Tensor
    weights: Tensor

    @property
    def num_tasks(self) -> int:
        return self.heads.shape[0]


def _mix(*values: int) -> int:
    """splitmix64 over a tuple of ints: decorrelated generator seeds for neighbouring (draw, layer) pairs."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def selection_noise(seed: int, draw: int, layer: int, num_tasks: int, pool_heads: int) -> Tensor:
    """g1 - g2 for every (task, pool head) of one layer: float32 [K, P], on CPU.

    A pure function of (seed, draw, layer): resuming at the same draw counter gives the same noise, and a
    tensor-parallel rank reproduces the single-process draw by slicing its pool columns.
    """
    gen = torch.Generator().manual_seed(_mix(seed, draw, layer))
    u = torch.rand(2, num_tasks, pool_heads, generator=gen, dtype=torch.float64)
    u = u.clamp_(1e-12, 1 - 1e-12)
    gumbel = -torch.log(-torch.log(u))
    return (gumbel[0] - gumbel[1]).float()


def select_heads(
    logits_KP: Tensor,
    active_heads: int,
    strategy: str,
    temperature: float,
    noise_KP: Tensor | None = None,
    partitions: int = 1,
) -> HeadChoice:
    """Map logits (and optional Gumbel noise) to the heads each task uses.

    `partitions` t > 1 is the tensor-parallel form: the pool is cut into t contiguous partitions and each
    picks H/t heads (identical to plain group selection; a *balanced* subset for the subset strategy).
    noise_KP=None is the deterministic evaluation rule.
    """
    K, P = logits_KP.shape
    scores = logits_KP if noise_KP is None else logits_KP + noise_KP.to(logits_KP)
    s_KP = torch.sigmoid(scores / temperature)
    if strategy == "group":
        r = P // active_heads
        best_KH = s_KP.detach().view(K, active_heads, r).argmax(dim=-1)
        heads_KH = best_KH + torch.arange(active_heads, device=s_KP.device) * r
    elif strategy == "subset":
        per_part, width = active_heads // partitions, P // partitions
        parts_KtW = s_KP.detach().view(K, partitions, width)
        top_Ktn = parts_KtW.topk(per_part, dim=-1).indices.sort(dim=-1).values
        offsets = torch.arange(partitions, device=s_KP.device)[:, None] * width
        heads_KH = (top_Ktn + offsets).reshape(K, active_heads)
    else:
        raise ValueError(f"unknown selection strategy {strategy!r}")
    s_KH = s_KP.gather(1, heads_KH)
    return HeadChoice(heads=heads_KH, weights=s_KH - s_KH.detach() + 1.0)


def bernoulli_kl(logits: Tensor, prior: float) -> Tensor:
    """Elementwise KL(Bernoulli(sigmoid(logits)) || Bernoulli(prior)), computed in log space."""
    q = torch.sigmoid(logits)
    log_q, log_1mq = nn.functional.logsigmoid(logits), nn.functional.logsigmoid(-logits)
    prior_t = torch.tensor(prior, dtype=logits.dtype, device=logits.device)
    return q * (log_q - prior_t.log()) + (1 - q) * (log_1mq - torch.log1p(-prior_t))


class HeadSelector(nn.Module):
    """Selector logits phi [K, L, P] for one attention type, and the choice they make each forward.

    Training: every call of forward() is one draw (one Gumbel sample per task per layer); the draw counter is a
    buffer, so a checkpoint resumes the noise sequence exactly. Eval: deterministic, counter untouched.
    `first_layer` is the global index of this selector's first layer (pipeline stages hold a slice of layers
    and must draw the same noise as a single process). `partitions` t > 1 selects H/t heads inside each of t
    contiguous pool partitions: what t tensor-parallel ranks do, reproducible on one process (a balanced
    subset; no change for the group strategy).

    `rank` k (tensor parallelism, docs/method.md): this selector holds only pool partition k, phi[:, :, k*P/t :
    (k+1)*P/t] (the full phi is drawn, then sliced, so every rank starts from the single-process logits), and
    forward() returns *local* choices (heads in [0, P/t), H/t slots) made from its slice of the full-pool noise:
    exactly rank k's part of the single-process `partitions=t` draw, with no communication. `table()` gives
    global head ids of its slots; `kl()` is its share of the KL (sum over ranks to log it). `pool_heads` and
    `active_heads` stay the global P and H; `pool_slice` / `local_active_heads` are what this module holds.
    """

    def __init__(
        self,
        num_tasks: int,
        num_layers: int,
        pool_heads: int,
        active_heads: int,
        strategy: str = "group",
        temperature: float = 5.0,
        seed: int = 0,
        init_range: tuple[float, float] = (-4.605170185988091, 0.0),
        first_layer: int = 0,
        partitions: int = 1,
        *,
        rank: int | None = None,
        noise_scale: float = 1.0,
    ):
        super().__init__()
        problems = head_problems(active_heads, pool_heads, partitions, strategy)
        if problems:
            raise ValueError("; ".join(problems))
        if rank is not None and not 0 <= rank < partitions:
            raise ValueError(f"rank={rank} must lie in [0, partitions={partitions})")
        self.num_tasks, self.num_layers = num_tasks, num_layers
        self.pool_heads, self.active_heads = pool_heads, active_heads
        self.strategy, self.seed, self.first_layer = strategy, seed, first_layer
        self.partitions, self.rank = partitions, rank
        self.noise_scale = float(noise_scale)  # selection.noise_scale; 0 = deterministic choice in training too
        self.rank_partitions = 1
        """Partitions inside this rank's pool slice (`part` keeps a finer split of the full selector: the LM
        selects per KV head, partitions = G, and a TP rank's slice holds G/t of them)."""
        logits = torch.empty(num_tasks, num_layers, pool_heads).uniform_(*init_range)
        self.logits = nn.Parameter(logits[:, :, self.pool_slice].clone() if rank is not None else logits)
        if rank is not None:
            _mark_pool_sharded(self.logits)
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    @property
    def pool_slice(self) -> slice:
        """The global pool heads this module holds: all of them, or partition `rank`."""
        if self.rank is None:
            return slice(0, self.pool_heads)
        width = self.pool_heads // self.partitions
        return slice(self.rank * width, (self.rank + 1) * width)

    @property
    def local_active_heads(self) -> int:
        return self.active_heads if self.rank is None else self.active_heads // self.partitions

    def part(self, layers: range | None = None, *, rank: int | None = None, partitions: int | None = None):
        """A new selector holding `layers` (rows of this one; pipeline stages) and, with `rank`, pool partition
        `rank` of `partitions` (tensor parallelism). Logits, draw counter, temperature and train/eval mode are
        copied; no random numbers are drawn. The logits of a layer slice carry `layer_offset` (their global first
        layer, read by the checkpoint layout)."""
        sliced = layers is not None
        layers = range(self.num_layers) if layers is None else layers
        new = copy.deepcopy(self)
        if rank is not None:
            if self.rank is not None:
                raise ValueError(f"this selector already holds pool partition {self.rank}; shard the full one")
            partitions = partitions or self.partitions
            problems = head_problems(self.active_heads, self.pool_heads, partitions, self.strategy)
            if problems or not 0 <= rank < partitions:
                raise ValueError("; ".join(problems) or f"rank={rank} must lie in [0, partitions={partitions})")
            new.partitions, new.rank = partitions, rank
            new.rank_partitions = self.partitions // partitions if self.partitions % partitions == 0 else 1
        cols = new.pool_slice if self.rank is None else slice(None)
        new.logits = nn.Parameter(self.logits.detach()[:, layers.start : layers.stop, cols].clone())
        for attr in _SHARD_ATTRS:
            if hasattr(self.logits, attr):
                setattr(new.logits, attr, getattr(self.logits, attr))
        if new.rank is not None:
            _mark_pool_sharded(new.logits)
        new.num_layers, new.first_layer = len(layers), self.first_layer + layers.start
        if sliced:
            new.logits.layer_offset = new.first_layer
        return new

    def set_temperature(self, tau: float) -> None:
        self.temperature.fill_(tau)

    def _choose(self, layer: int, noise_KP: Tensor | None) -> HeadChoice:
        """The choice of one layer (held-row index) from full-pool noise [K, P] or None (deterministic)."""
        tau = float(self.temperature)
        logits_KP = self.logits[:, layer]
        if self.rank is None:
            return select_heads(logits_KP, self.active_heads, self.strategy, tau, noise_KP, self.partitions)
        noise_KP = None if noise_KP is None else noise_KP[:, self.pool_slice]
        return select_heads(logits_KP, self.local_active_heads, self.strategy, tau, noise_KP, self.rank_partitions)

    def forward(self) -> list[HeadChoice]:
        """One HeadChoice per layer (all K tasks); in training this consumes one draw."""
        choices = []
        draw = int(self.draws)
        for layer in range(self.num_layers):
            noise = None
            if self.training and self.noise_scale > 0:
                noise = self.noise_scale * selection_noise(  # x * 1.0 == x: the paper's draws bit for bit
                    self.seed, draw, self.first_layer + layer, self.num_tasks, self.pool_heads
                ).to(self.logits.device)
            choices.append(self._choose(layer, noise))
        if self.training:
            self.draws += 1
        return choices

    def kl(self, task_ids: Tensor | None = None) -> Tensor:
        """KL(q(z) || Bernoulli(H/P)) summed over layers and (held) pool heads, averaged over the given tasks.

        q(z_h = 1) = sigmoid(phi_h) is the Bernoulli the relaxed sample approximates; the prior keeps H of P.
        task_ids: long [B] (duplicates are counted once) or None for every task.
        """
        logits = self.logits if task_ids is None else self.logits[torch.unique(task_ids)]
        per_task = bernoulli_kl(logits, self.active_heads / self.pool_heads).sum(dim=(1, 2))
        return per_task.mean()

    @torch.no_grad()
    def table(self) -> list[list[list[int]]]:
        """Deterministic selection: table[task][layer] = global pool heads in slot order (a rank: its slots)."""
        offset = self.pool_slice.start
        per_layer = [
            (self._choose(layer, None).heads + offset).tolist() for layer in range(self.num_layers)
        ]
        return [[per_layer[layer][k] for layer in range(self.num_layers)] for k in range(self.num_tasks)]

    def extra_repr(self) -> str:
        shard = "" if self.rank is None else f", partition={self.rank}/{self.partitions}"
        return (
            f"tasks={self.num_tasks}, layers={self.num_layers}, pool={self.pool_heads}, "
            f"active={self.active_heads}, strategy={self.strategy}{shard}"
        )


# megatron's names for "this parameter is split over the TP group along partition_dim": its grad-norm and our
# checkpoint layout read them. Set as plain attributes so that selection/ needs no megatron import.
_SHARD_ATTRS = ("tensor_model_parallel", "partition_dim", "partition_stride", "layer_offset")


def _mark_pool_sharded(logits: Tensor) -> None:
    logits.tensor_model_parallel, logits.partition_dim, logits.partition_stride = True, 2, 1


def format_selection_table(tables: dict[str, list[list[list[int]]]], task_names: list[str]) -> str:
    """Text table: one row per (attention type, task), one column per layer, cells list the heads."""
    lines = []
    for attn_type, table in tables.items():
        num_layers = len(table[0]) if table else 0
        header = f"{attn_type:<14} {'task':<12} " + " ".join(f"L{layer:<10}" for layer in range(num_layers))
        lines.append(header)
        for name, per_layer in zip(task_names, table, strict=True):
            cells = " ".join(f"{','.join(map(str, heads)):<11}" for heads in per_layer)
            lines.append(f"{'':<14} {name:<12} {cells}")
    return "\n".join(lines)
