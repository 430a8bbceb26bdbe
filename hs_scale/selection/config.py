"""Configuration of head selection (Gong et al. 2021, section 3)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from hs_scale.selection.sites import SITE_NAMES
from hs_scale.tasks import TASK_KEY_TYPES

STRATEGIES = ("group", "subset")


def head_problems(num_heads: int, pool_heads: int, tensor_parallel: int = 1, strategy: str = "group") -> list[str]:
    """Every way H = `num_heads` active heads, a pool of H' = `pool_heads` and `tensor_parallel` t do not fit.

    The one statement of the rule (docs/method.md): H' >= H; the group strategy cuts the pool into H groups of
    r = H'/H heads; under TP each rank owns H'/t contiguous pool heads and computes H/t slots. Empty = fine.
    The config refuses these at load time; the selector re-checks them when built outside a config.
    """
    problems = []
    if pool_heads < num_heads:
        problems.append(
            f"selection.pool_heads={pool_heads} is smaller than model.num_heads={num_heads}; the pool H' must hold "
            f"at least H heads (the paper uses H' = 2H = {2 * num_heads})"
        )
    t = tensor_parallel
    fix = f"use tensor_parallel in {[d for d in range(1, num_heads + 1) if num_heads % d == 0 and pool_heads % d == 0]}"
    if num_heads % t:
        problems.append(
            f"model.num_heads H={num_heads} is not divisible by tensor_parallel={t}: every TP rank must compute "
            f"exactly H/t selected heads; {fix} or change num_heads to a multiple of {t}"
        )
    if pool_heads % t:
        problems.append(
            f"selection.pool_heads H'={pool_heads} is not divisible by tensor_parallel={t}: each rank owns a "
            f"contiguous slice of the pool (and of phi); {fix} or change pool_heads to a multiple of {t}"
        )
    if strategy == "group" and pool_heads >= num_heads and pool_heads % num_heads:
        problems.append(
            f"selection.pool_heads={pool_heads} is not a multiple of model.num_heads={num_heads}, which the group "
            f"strategy needs (H' = r*H); use pool_heads={2 * num_heads} or strategy=subset"
        )
    return problems


@dataclass
class SelectionConfig:
    enabled: bool = True
    """Master switch. False: every attention layer is an ordinary dense H-head attention."""

    strategy: str = "group"
    """"group": pool split into H contiguous groups of r = H'/H heads, slot g takes the best head of group g
    (wins every table of the paper). "subset": the H best heads of the whole pool, slotted in ascending order."""

    pool_heads: int = 8
    """H', the number of candidate heads per attention layer. The active count H is `model.num_heads`."""

    encoder_self: bool = True
    """Select heads in encoder self-attention (keyed on the source task)."""

    decoder_self: bool = True
    """Select heads in decoder self-attention (keyed on the target task)."""

    cross: bool = True
    """Select heads in encoder-decoder attention (keyed on the target task)."""

    task_key: str = "lang"
    """What a task is: "lang", "domain" or the composite "lang+domain"."""

    temperature: float = 5.0
    """Gumbel-sigmoid temperature tau (the reference recipe keeps 5.0 fixed)."""

    temperature_min: float = 5.0
    """Floor of the annealed temperature; equal to `temperature` means no annealing."""

    temperature_decay: float = 0.0
    """Annealing rate: tau(step) = max(temperature_min, temperature * exp(-temperature_decay * step))."""

    noise_scale: float = 1.0
    """Multiplier of the Gumbel noise g1 - g2 added to phi when training draws heads (1 = the paper; 0 = train
    on the deterministic selection, phi still learning through the straight-through weights). The noise explores
    head choices; at CPU budgets it costs more than it finds (docs/results.md, "Where group loses")."""

    kl_weight: float = 0.0
    """Weight of KL(q(z) || Bernoulli(H/H')) in the loss (the paper's ELBO prior; the reference recipe uses 0)."""

    init_low: float = math.log(0.01)
    """Selector logits phi are initialised uniform in [init_low, init_high] (reference: [log 0.01, log 1])."""

    init_high: float = 0.0

    seed: int = 1234
    """Seed of the Gumbel noise. Noise is a pure function of (seed, draw counter, layer), so it is reproducible
    across resumes and identical on every tensor-parallel rank."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"selection.strategy={self.strategy!r} is unknown; use one of {STRATEGIES}")
        if self.task_key not in TASK_KEY_TYPES:
            raise ValueError(f"selection.task_key={self.task_key!r} is unknown; use one of {TASK_KEY_TYPES}")
        if self.pool_heads < 1:
            raise ValueError(f"selection.pool_heads={self.pool_heads} must be >= 1")
        if self.temperature <= 0 or self.temperature_min <= 0:
            raise ValueError("selection.temperature and selection.temperature_min must be > 0")
        if self.temperature_min > self.temperature:
            raise ValueError(
                f"selection.temperature_min={self.temperature_min} exceeds selection.temperature="
                f"{self.temperature}; set temperature_min <= temperature (equal disables annealing)"
            )
        if self.temperature_decay < 0:
            raise ValueError(f"selection.temperature_decay={self.temperature_decay} must be >= 0")
        if not 0 <= self.noise_scale < math.inf:
            raise ValueError(f"selection.noise_scale={self.noise_scale} must be a finite number >= 0 (1 = the paper)")
        if self.kl_weight < 0:
            raise ValueError(f"selection.kl_weight={self.kl_weight} must be >= 0")
        if self.init_low > self.init_high:
            raise ValueError("selection.init_low must be <= selection.init_high")

    def check_heads(self, active_heads: int, tensor_parallel: int = 1) -> None:
        """Refuse pools that do not fit H = `active_heads` (and the TP size): `head_problems`, when selecting."""
        if self.enabled:
            problems = head_problems(active_heads, self.pool_heads, tensor_parallel, self.strategy)
            if problems:
                raise ValueError("; ".join(problems))

    def selected_types(self) -> tuple[str, ...]:
        """Attention sites (hs_scale.selection.sites) with selection switched on, in declaration order."""
        if not self.enabled:
            return ()
        return tuple(name for name in SITE_NAMES if getattr(self, name))

    def temperature_at(self, step: int) -> float:
        return max(self.temperature_min, self.temperature * math.exp(-self.temperature_decay * step))
