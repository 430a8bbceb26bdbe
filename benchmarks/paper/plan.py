"""The benchmark plan: a preset's YAML (configs/<preset>.yaml) read into typed dataclasses, and expanded into cells.

A plan names corpora (a data_pipelines recipe with build overrides, or a train-subsampled copy of another corpus),
and experiments (a corpus, an hs_scale run config with `--section.field value` overrides, variants, pool sizes,
seeds, evaluation). A *cell* is one (experiment, variant, H', seed): one `hs_scale.training.run.train(cfg)` call
and one evaluation.

Variants, all at the same number H = model.num_heads of *active* heads per attention layer:
    shared    selection off, H heads (the baseline; the decoder starts from the target-language tag)
    group     group selection, H of a pool of H' heads
    subset    subset selection, H of a pool of H' heads
    allheads  selection off, H' heads (capacity control: every pool head active, head dim d/H' instead of d/H)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hs_scale.config import ConfigError, build_dataclass

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
VARIANTS = ("shared", "group", "subset", "allheads")
EXPERIMENTS = ("asr", "domains", "st", "mt", "hsweep")


@dataclass
class CorpusSpec:
    recipe: str = ""
    """data_pipelines recipe to build (asr8, st8, domains, mt, demo); empty when `from` is set."""
    build: dict = field(default_factory=dict)
    """Recipe field overrides passed to data_pipelines.recipes.build_recipe (size, features, text_source...)."""
    source: str = ""
    """Name of another corpus of the plan to derive this one from (YAML key `from`)."""
    subsample: dict[str, float] = field(default_factory=dict)
    """Derived corpora: {language: fraction of its train utterances kept}; dev/test untouched."""

    def __post_init__(self):
        if bool(self.recipe) == bool(self.source):
            raise ValueError("give a corpus either `recipe:` (built) or `from:` (derived from another corpus)")
        if self.subsample and not self.source:
            raise ValueError("`subsample:` needs `from:` (the corpus whose train split is subsampled)")
        for lang, frac in self.subsample.items():
            if not 0 < float(frac) <= 1:
                raise ValueError(f"subsample.{lang}={frac}: a fraction in (0, 1]")


@dataclass
class EvalSpec:
    split: str = "test"
    """Corpus split decoded for the tables."""
    beam: int = 1
    """Beam size (1 = greedy)."""
    max_len_a: float = 0.0
    max_len_b: int = 200
    """Max output tokens = max_len_a * source length + max_len_b (caps the cost of a model that never stops)."""
    average_last: int = 1
    """Checkpoints averaged for evaluation (the paper: 10); the trainer keeps train.keep_last of them."""

    def __post_init__(self):
        if self.beam < 1 or self.average_last < 1:
            raise ValueError("beam and average_last must be >= 1")


@dataclass
class ExperimentSpec:
    corpus: str = ""
    """A corpus name of the plan."""
    config: str = ""
    """hs_scale run config (YAML, relative to configs/): model, selection, data, train sections."""
    overrides: dict = field(default_factory=dict)
    """Extra `--section.field value` overrides of the run config, as {"section.field": value}."""
    metric: str = "wer"
    """wer (lower is better) or bleu (higher is better)."""
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    pool_heads: list[int] = field(default_factory=list)
    """H' values for group, subset and allheads; empty = [2H]."""
    seeds: int = 0
    """Seeds per cell; 0 = the plan's `seeds`."""
    groups: dict[str, str] = field(default_factory=dict)
    """Extra averages over task labels matching a glob, e.g. {o2m: "en->*", m2o: "*->en"}."""
    eval: EvalSpec = field(default_factory=EvalSpec)

    def __post_init__(self):
        if not self.corpus or not self.config:
            raise ValueError("every experiment needs `corpus:` and `config:`")
        if self.metric not in ("wer", "bleu"):
            raise ValueError(f"metric={self.metric!r}: use wer or bleu")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise ValueError(f"variants={self.variants}: choose from {list(VARIANTS)}")
        if any(p < 1 for p in self.pool_heads):
            raise ValueError(f"pool_heads={self.pool_heads}: every H' must be >= 1")


@dataclass
class Plan:
    workers: int = 2
    """Cells run concurrently, one process each."""
    seeds: int = 3
    device: str = "cpu"
    """train.device and the evaluation device of every cell."""
    corpora: dict[str, CorpusSpec] = field(default_factory=dict)
    experiments: dict[str, ExperimentSpec] = field(default_factory=dict)

    def __post_init__(self):
        if self.workers < 1 or self.seeds < 1:
            raise ValueError("workers and seeds must be >= 1")
        for name, exp in self.experiments.items():
            if name not in EXPERIMENTS:
                raise ValueError(f"experiments.{name}: unknown experiment; use one of {list(EXPERIMENTS)}")
            if exp.corpus not in self.corpora:
                raise ValueError(f"experiments.{name}.corpus={exp.corpus!r} is not among corpora {list(self.corpora)}")
            if not (CONFIG_DIR / exp.config).is_file():
                raise ValueError(f"experiments.{name}.config={exp.config!r}: no such file in {CONFIG_DIR}")
        for name, c in self.corpora.items():
            if c.source and c.source not in self.corpora:
                raise ValueError(f"corpora.{name}.from={c.source!r} is not among corpora {list(self.corpora)}")


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan; errors name the field (`ConfigError`)."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"plan {path}: {err}") from None
    # hs_scale.config checks the field names and types of dataclasses, but keeps dict values as they are: build the
    # named corpora and experiments one by one so that their fields are checked too.
    corpora = {}
    for name, corpus in (raw.pop("corpora", None) or {}).items():
        if isinstance(corpus, dict) and "from" in corpus:  # `from` is a Python keyword: stored as `source`
            corpus = {**corpus, "source": corpus["from"]}
            del corpus["from"]
        corpora[name] = build_dataclass(CorpusSpec, corpus, f"corpora.{name}")
    experiments = {name: build_dataclass(ExperimentSpec, exp, f"experiments.{name}")
                   for name, exp in (raw.pop("experiments", None) or {}).items()}
    plan = build_dataclass(Plan, raw, "")
    plan.corpora, plan.experiments = corpora, experiments
    try:
        plan.__post_init__()
    except ValueError as err:
        raise ConfigError(f"plan {path}: {err}") from None
    return plan


@dataclass(frozen=True)
class Cell:
    experiment: str
    variant: str
    pool_heads: int
    """H' of the cell: the pool for group/subset, the head count for allheads, H for shared."""
    active_heads: int
    """Heads computed per attention layer: H, except allheads (H')."""
    seed: int
    corpus: str
    config: str
    overrides: tuple[str, ...]
    """Every `--section.field=value` override except the per-cell paths (manifest, output dir)."""
    eval: dict
    """EvalSpec fields plus the experiment's metric."""

    @property
    def key(self) -> str:
        """Directory name: identical settings give the same cell, so experiments share cells (asr and hsweep)."""
        text = (CONFIG_DIR / self.config).read_text()
        blob = json.dumps([self.corpus, text, self.overrides, self.eval], sort_keys=True)
        digest = hashlib.sha1(blob.encode()).hexdigest()[:10]
        return f"{self.variant}_P{self.pool_heads}_s{self.seed}_{digest}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["overrides"] = list(self.overrides)
        return d


def _flat(overrides: dict) -> list[str]:
    return [f"--{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()]


def variant_overrides(variant: str, pool_heads: int) -> list[str]:
    """The config overrides that turn the experiment's run config into `variant` (module docstring)."""
    if variant == "shared":
        return ["--selection.enabled=false"]
    if variant == "allheads":
        return ["--selection.enabled=false", f"--model.num_heads={pool_heads}"]
    return ["--selection.enabled=true", f"--selection.strategy={variant}", f"--selection.pool_heads={pool_heads}"]


def active_heads_of(exp: ExperimentSpec) -> int:
    """H of the experiment: model.num_heads of its run config after its overrides (the config is validated here,
    so a misspelt field fails before any cell starts)."""
    from hs_scale.config import load_config

    return load_config(CONFIG_DIR / exp.config, _flat(exp.overrides)).model.num_heads


def expand(plan: Plan, name: str) -> list[Cell]:
    """Every cell of experiment `name`, seed-major (the first seed of every variant finishes first)."""
    exp = plan.experiments[name]
    H = active_heads_of(exp)
    pools = exp.pool_heads or [2 * H]
    base = _flat(exp.overrides) + [f"--train.device={plan.device}"]
    cells = []
    for seed in range(1, (exp.seeds or plan.seeds) + 1):
        for variant in exp.variants:
            for pool in [H] if variant == "shared" else pools:
                if variant == "allheads" and pool == H:
                    continue  # all H' = H heads active is the shared baseline itself
                seeds = [f"--train.seed={seed}", f"--data.seed={seed}", f"--selection.seed={1000 + seed}"]
                active = pool if variant == "allheads" else H
                cells.append(Cell(name, variant, pool, active, seed, exp.corpus, exp.config,
                                  tuple(base + seeds + variant_overrides(variant, pool)),
                                  {**dataclasses.asdict(exp.eval), "metric": exp.metric}))
    return cells


def check_cell_config(cell: Cell, manifest: str, vocab_size: int, output_dir: str):
    """The validated hs_scale Config of a cell (unknown or invalid fields raise `ConfigError` naming them)."""
    from hs_scale.config import load_config

    overrides = [*cell.overrides, f"--data.manifest={manifest}", f"--model.vocab_size={vocab_size}",
                 f"--train.output_dir={output_dir}"]
    try:
        return load_config(CONFIG_DIR / cell.config, overrides)
    except ConfigError as err:
        raise ConfigError(f"experiment {cell.experiment}, variant {cell.variant} (H'={cell.pool_heads}), "
                          f"config {cell.config}: {err}") from None
