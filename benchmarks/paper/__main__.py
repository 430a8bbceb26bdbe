"""`python -m benchmarks.paper`: the paper's experiments in direction (head selection vs shared attention).

    python -m benchmarks.paper --preset cpu --experiment asr            # <= 90 min on 2 cores
    python -m benchmarks.paper --preset gpu --experiment all            # sized for one H200, ~10 min
    python -m benchmarks.paper --smoke --experiment asr --out /tmp/p     # the CI check, < 1 min
    python -m benchmarks.paper --preset cpu --experiment asr --seeds 1 --set train.steps=100   # timing probe

Writes benchmarks/results/paper_<preset>.json (every cell, and per experiment and variant the mean/std of the
task-averaged metric and its direction), paper_<preset>.md (tables, verdict, figures in paper_<preset>/).
Results of experiments not run now are kept from an existing JSON of the same preset. Cells, logs and corpora go
to --out and --data-dir (not committed); an interrupted run resumes from the cells already done.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.paper import corpora
from benchmarks.paper.plan import CONFIG_DIR, EXPERIMENTS, expand, load_plan
from benchmarks.paper.report import write_report
from benchmarks.paper.runner import REPO, run_cells
from benchmarks.paper.summary import all_finite, summarize_experiment
from hs_scale.config import ConfigError

CELL_FIELDS = ("experiment", "variant", "pool_heads", "active_heads", "seed", "metric", "scores", "average",
               "num_sentences", "signature", "train_s", "eval_s", "train_cpu_s", "eval_cpu_s", "process_cpu_s", "dev",
               "task_names", "encoder_tasks", "decoder_tasks", "selection")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.paper", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("cpu", "gpu"), default="cpu", help="configs/<preset>.yaml")
    p.add_argument("--experiment", choices=(*EXPERIMENTS, "all"), default="all")
    p.add_argument("--seeds", type=int, help="seeds per cell (default: the plan's, >= 3)")
    p.add_argument("--smoke", action="store_true",
                   help="configs/smoke.yaml: tiny corpora, 1 seed, a few steps per cell (CI keeps the harness working)")
    p.add_argument("--out", help="cells and logs (default runs/paper_<preset>)")
    p.add_argument("--data-dir", help="corpora (default data/paper; --smoke: <out>/corpora)")
    p.add_argument("--json", help="results JSON (default benchmarks/results/paper_<preset>.json; --smoke: "
                   "<out>/paper_smoke.json); the markdown report goes next to it")
    p.add_argument("--workers", type=int, help="cells run at once (default: the plan's)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a run-config field in every cell, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each cell's checkpoints")
    return p


def _machine() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "gpu": gpu}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _compact(cell: dict) -> dict:
    return {k: cell[k] for k in CELL_FIELDS if k in cell}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    name = "smoke" if args.smoke else args.preset
    plan = load_plan(CONFIG_DIR / f"{name}.yaml")
    if args.workers:
        plan.workers = args.workers
    out = Path(args.out or f"runs/paper_{name}")
    data_dir = Path(args.data_dir or (out / "corpora" if args.smoke else "data/paper"))
    json_path = Path(args.json or (out / "paper_smoke.json" if args.smoke else f"benchmarks/results/paper_{name}.json"))
    names = [e for e in EXPERIMENTS if e in plan.experiments] if args.experiment == "all" else [args.experiment]
    missing = [e for e in names if e not in plan.experiments]
    if missing:
        print(f"paper: experiment {missing[0]!r} is not in {CONFIG_DIR / (name + '.yaml')}", file=sys.stderr)
        return 2
    extra = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            print(f"paper: --set {item!r}: expected SECTION.FIELD=VALUE, e.g. train.steps=100", file=sys.stderr)
            return 2
        extra[key] = value
    try:
        cells_of = {}
        for e in names:
            exp = plan.experiments[e]
            exp.overrides.update(extra)
            if args.seeds:
                exp.seeds = args.seeds
            cells_of[e] = expand(plan, e)
    except ConfigError as err:
        print(f"paper: {err}", file=sys.stderr)
        return 2

    results = {"experiments": {}, "failed": []}
    if json_path.is_file():
        results = json.loads(json_path.read_text())
    machine = _machine()
    results.update({"preset": name, "date": datetime.date.today().isoformat(), "machine": machine,
                    "commit": _commit(), "smoke": args.smoke})
    manifests = corpora.prepare(plan, sorted({plan.experiments[e].corpus for e in names}), data_dir)
    failed: list[str] = []
    command = "python -m benchmarks.paper " + " ".join(argv if argv is not None else sys.argv[1:])
    for e in names:
        exp = plan.experiments[e]
        start = time.perf_counter()
        cells, errors = run_cells(cells_of[e], manifests, out / "cells", plan.workers, args.keep_checkpoints)
        failed += errors
        if not cells:
            continue
        task_key = "domain" if exp.overrides.get("data.task_key") == "domain" else "lang"
        src = plan.corpora[exp.corpus]
        results["experiments"][e] = {
            "command": command, "date": results["date"], "wall_s": round(time.perf_counter() - start, 1),
            "corpus": exp.corpus,
            "corpus_dir": str(manifests[exp.corpus]),
            "train_sizes": corpora.train_sizes(manifests[exp.corpus], task_key),
            "low_resource": sorted(src.subsample), "config": exp.config, "overrides": exp.overrides,
            "eval": {**vars(exp.eval)}, "summary": summarize_experiment(cells, exp.groups),
            "cells": [_compact(c) for c in cells],
        }
        results["failed"] = failed
        _write(results, json_path)
    results["failed"] = failed
    _write(results, json_path)
    print(f"[paper] wrote {json_path} and {json_path.with_suffix('.md')}")
    for e in names:
        if e in results["experiments"] and results["experiments"][e]["summary"]["verdict"]:
            print(f"[paper] {e}: {results['experiments'][e]['summary']['verdict']['text']}")
    ok = all(all_finite(results["experiments"][e]["cells"]) for e in names if e in results["experiments"])
    return 1 if failed or not ok else 0


def _write(results: dict, json_path: Path) -> None:
    """The JSON, with a flat `summary` {experiment: {row: mean, std, direction...}}, and the report from it."""
    results["summary"] = {
        e: {key: {"variant": r["variant"], "pool_heads": r["pool_heads"], "active_heads": r["active_heads"],
                  "mean": r["mean"], "std": r["std"], "n": r["n"], "metric": x["summary"]["metric"],
                  "direction": x["summary"]["direction"]}
            for key, r in x["summary"]["rows"].items()}
        for e, x in results["experiments"].items()}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    write_report(results, json_path.with_suffix(".md"))


if __name__ == "__main__":
    sys.exit(main())
