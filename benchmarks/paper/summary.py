"""Cells -> the paper's tables: mean +- std over seeds per task and task-averaged, and the verdict on group vs shared.

Rows are keyed by variant ("shared", "group", ...), or "<variant>_h<H'>" where an experiment runs a variant at
several pool sizes (the H' sweep). std is the sample standard deviation over seeds (ddof 1; None with one seed).
Verdict: group beats the baseline when its task-averaged metric is better than shared's by more than the larger of
the two seed stds (a difference inside the seed noise is no evidence either way).
"""

from __future__ import annotations

import fnmatch
import math
import statistics

from hs_scale.evaluation.metrics import HIGHER_IS_BETTER


def mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def row_key(variant: str, pool: int, pools_of_variant: set[int]) -> str:
    return variant if len(pools_of_variant) == 1 else f"{variant}_h{pool}"


def _ms(values: list[float]) -> dict:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "n": len(values)}


def summarize_experiment(cells: list[dict], groups: dict[str, str]) -> dict:
    """Summary of one experiment's cells (module docstring); {"metric", "direction", "tasks", "rows", "verdict"}."""
    metric = cells[0]["metric"]
    pools: dict[str, set[int]] = {}
    for c in cells:
        pools.setdefault(c["variant"], set()).add(c["pool_heads"])
    by_row: dict[str, list[dict]] = {}
    for c in cells:
        by_row.setdefault(row_key(c["variant"], c["pool_heads"], pools[c["variant"]]), []).append(c)
    tasks = sorted({t for c in cells for t in c["scores"]})
    rows = {}
    for key, cs in by_row.items():
        cs = sorted(cs, key=lambda c: c["seed"])
        row = {"variant": cs[0]["variant"], "pool_heads": cs[0]["pool_heads"], "active_heads": cs[0]["active_heads"],
               "seeds": [c["seed"] for c in cs], **_ms([c["average"] for c in cs]),
               "per_task": {t: _ms([c["scores"][t] for c in cs]) for t in tasks if all(t in c["scores"] for c in cs)},
               "groups": {}, "train_s": _ms([c["train_s"] for c in cs])["mean"],
               "eval_s": _ms([c["eval_s"] for c in cs])["mean"]}
        for name, pattern in groups.items():
            members = [t for t in tasks if fnmatch.fnmatchcase(t, pattern)]
            if members:
                row["groups"][name] = _ms([statistics.fmean(c["scores"][t] for t in members) for c in cs])
        rows[key] = row
    order = {v: i for i, v in enumerate(("shared", "group", "subset", "allheads"))}
    rows = dict(sorted(rows.items(), key=lambda kv: (order[kv[1]["variant"]], kv[1]["pool_heads"])))
    return {"metric": metric, "direction": "higher" if HIGHER_IS_BETTER[metric] else "lower", "tasks": tasks,
            "rows": rows, "verdict": verdict(rows, metric)}


def verdict(rows: dict, metric: str) -> dict | None:
    """Does group beat shared by more than the seed std? None when the experiment lacks either row."""
    if "shared" not in rows or "group" not in rows:
        return None
    base, group = rows["shared"], rows["group"]
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    gain = sign * (group["mean"] - base["mean"])  # > 0: group is better
    stds = [s for s in (base["std"], group["std"]) if s is not None]
    noise = max(stds) if stds else None
    beats = None if noise is None else bool(gain > noise)
    name = metric.upper()
    if noise is None:
        text = (f"group {name} {group['mean']:.2f} vs shared {base['mean']:.2f} (gain {gain:+.2f}); one seed only, "
                "so no statement against the seed std")
    else:
        text = (f"group {name} {group['mean']:.2f} vs shared {base['mean']:.2f}: gain {gain:+.2f} "
                f"{'>' if beats else '<='} seed std {noise:.2f}, so group "
                f"{'beats' if beats else 'does NOT beat'} the baseline by more than the seed std")
    return {"baseline": base["mean"], "group": group["mean"], "gain": gain, "seed_std": noise,
            "group_beats_baseline": beats, "text": text}


def _fmt(entry: dict | None) -> str:
    if entry is None:
        return "-"
    if entry["std"] is None:
        return f"{entry['mean']:.1f}"
    return f"{entry['mean']:.1f} ± {entry['std']:.1f}"


def markdown_table(summary: dict) -> str:
    """Rows = variants (with H, H'), columns = tasks, groups, then the average (mean ± std over seeds)."""
    tasks = summary["tasks"]
    group_names = sorted({g for r in summary["rows"].values() for g in r["groups"]})
    head = ["model", "H", "H'", "seeds", *tasks, *group_names, "avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, r in summary["rows"].items():
        cells = [key, str(r["active_heads"]), str(r["pool_heads"]), str(r["n"]),
                 *[_fmt(r["per_task"].get(t)) for t in tasks], *[_fmt(r["groups"].get(g)) for g in group_names],
                 f"**{_fmt(r)}**"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def all_finite(cells: list[dict]) -> bool:
    return all(math.isfinite(c["average"]) and all(math.isfinite(v) for v in c["scores"].values()) for c in cells)
