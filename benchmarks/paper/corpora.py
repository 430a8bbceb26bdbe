"""The plan's corpora: built with data_pipelines' recipes, or derived by subsampling another corpus's train split.

Each corpus lives in `<data_dir>/<name>-<hash of its settings>`, so presets never overwrite each other's corpora
and a corpus is built once and reused (a folder with info.json is complete: it is renamed into place last).

Low-resource languages: neither hs_scale.data (no per-task filter or size option in DataConfig; `task_weights`
only changes sampling) nor the recipes (one size for all languages) can shrink one language's training data, so
a *derived* corpus is written here: a copy of the Parquet manifest without the dropped train rows, next to links
to the source corpus's shards, tokenizer and CMVN statistics. The loader only reads the keys its manifest lists,
so nothing else changes; the tokenizer and CMVN stats stay those of the full corpus (the low-resource languages'
dropped sentences are in the tokenizer's training text, which the tables should not care about).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

from benchmarks.paper.plan import CorpusSpec, Plan

_LINKED = ("shards", "tokenizer.model", "tokenizer.vocab", "cmvn.json")


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def corpus_dir(plan: Plan, name: str, data_dir: Path) -> Path:
    """Where corpus `name` of the plan lives (its settings and, for derived corpora, its source's folder)."""
    spec = plan.corpora[name]
    if spec.source:
        settings = {"from": str(corpus_dir(plan, spec.source, data_dir)), "subsample": spec.subsample}
    else:
        settings = {"recipe": spec.recipe, "build": spec.build}
    return data_dir / f"{name}-{_digest(settings)}"


def prepare(plan: Plan, names: list[str], data_dir: Path, log=print) -> dict[str, Path]:
    """Build or reuse every corpus in `names` (and the corpora they derive from); {name: folder}."""
    out: dict[str, Path] = {}
    for name in names:
        spec = plan.corpora[name]
        if spec.source:
            prepare(plan, [spec.source], data_dir, log)
        path = corpus_dir(plan, name, data_dir)
        if (path / "info.json").is_file():
            log(f"[paper] corpus {name}: reusing {path}")
        elif spec.source:
            derive(corpus_dir(plan, spec.source, data_dir), path, spec.subsample)
            log(f"[paper] corpus {name}: derived {path} from {spec.source} ({_counts(path)})")
        else:
            build(spec, path, workers=plan.workers)
            log(f"[paper] corpus {name}: built {path} ({_counts(path)})")
        out[name] = path
    return out


def build(spec: CorpusSpec, path: Path, workers: int) -> None:
    from data_pipelines.recipes import build_recipe

    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    # YAML gives lists; the recipe's multi-valued fields (langs, domains, conditions) are tuples.
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.build.items()}
    build_recipe(spec.recipe, str(tmp), workers=workers, **overrides)
    tmp.rename(path)


def derive(source: Path, path: Path, subsample: dict[str, float]) -> None:
    """Write `path`: `source`'s manifest minus train rows of the subsampled languages, links to the rest.

    A language keeps the first ceil(fraction * n) of its train rows in manifest order (the recipes order each
    language's sentences by a hash, so that is a reproducible random sample).
    """
    import pyarrow.parquet as pq

    table = pq.read_table(source / "manifest.parquet")
    split, lang = table.column("split").to_pylist(), table.column("lang").to_pylist()
    missing = sorted(set(subsample) - set(lang))
    if missing:
        raise ValueError(f"subsample names languages {missing} that {source} does not hold (it has "
                         f"{sorted(set(lang))}); fix `subsample:` in the plan")
    quota = {lg: math.ceil(float(f) * sum(1 for s, x in zip(split, lang, strict=True) if s == "train" and x == lg))
             for lg, f in subsample.items()}
    keep = []
    for i, (s, lg) in enumerate(zip(split, lang, strict=True)):
        if s == "train" and lg in quota:
            if quota[lg] == 0:
                continue
            quota[lg] -= 1
        keep.append(i)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pq.write_table(table.take(keep), tmp / "manifest.parquet")
    for name in _LINKED:
        if (source / name).exists():
            os.symlink((source / name).resolve(), tmp / name)
    info = json.loads((source / "info.json").read_text())
    info.update({"derived_from": str(source.resolve()), "subsample": subsample, "num_samples": len(keep)})
    info["splits"] = _split_counts(table.take(keep).column("split").to_pylist())
    (tmp / "info.json").write_text(json.dumps(info, indent=1, sort_keys=True))
    tmp.rename(path)


def _split_counts(splits: list[str]) -> dict[str, int]:
    return {s: splits.count(s) for s in sorted(set(splits))}


def _counts(path: Path) -> str:
    info = json.loads((path / "info.json").read_text())
    return ", ".join(f"{k} {v}" for k, v in info["splits"].items())


def train_sizes(path: Path, task_key: str = "lang") -> dict[str, int]:
    """Train utterances per language (or domain) of a corpus, for the report."""
    import pyarrow.parquet as pq

    col = "domain" if task_key == "domain" else "lang"
    t = pq.read_table(path / "manifest.parquet", columns=["split", col]).to_pydict()
    sizes: dict[str, int] = {}
    for s, v in zip(t["split"], t[col], strict=True):
        if s == "train":
            sizes[v] = sizes.get(v, 0) + 1
    return dict(sorted(sizes.items()))
