"""The report's figures (matplotlib, Agg): metric bars with seed error bars, and the paper's Figs 3-4 analysis.

    metric_bars(summary, title, path)             per-task WER/BLEU per variant, error bars = std over seeds
    shared_heads_plot(cells, title, path)         heads shared between task pairs, one panel per attention type
    head_load_plot(cells_by_variant, title, path) number of pool heads used by n tasks, one panel per attention type

The analysis averages over the seeds of a variant and uses, per attention type, only the tasks that side trains
(encoder types: source tasks; decoder types: target tasks).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from hs_scale.selection.analysis import load_histogram, shared_heads  # noqa: E402

ENCODER_TYPES = ("encoder_self",)
COLORS = {"shared": "#7f7f7f", "group": "#1f77b4", "subset": "#ff7f0e", "allheads": "#2ca02c"}


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def metric_bars(summary: dict, title: str, path: Path) -> Path:
    tasks = summary["tasks"]
    labels = [*tasks, "avg"]
    rows = summary["rows"]
    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(min(14.0, 2.0 + 0.25 * len(labels) * max(1, len(rows))), 3.2))
    x = np.arange(len(labels))
    seen: dict[str, int] = {}
    for i, (key, r) in enumerate(rows.items()):
        entries = [r["per_task"].get(t) for t in tasks] + [r]
        means = [e["mean"] if e else np.nan for e in entries]
        stds = [(e["std"] or 0.0) if e else 0.0 for e in entries]
        shade = seen[r["variant"]] = seen.get(r["variant"], -1) + 1  # H' sweep: lighter bars for larger pools
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=key,
               color=COLORS[r["variant"]], alpha=1.0 - 0.3 * shade)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8, rotation=30 if len(labels) > 10 else 0)
    arrow = "higher is better" if summary["direction"] == "higher" else "lower is better"
    ax.set_ylabel(f"{summary['metric'].upper()} ({arrow})", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=min(4, len(rows)))
    return _save(fig, path)


def _side_rows(cell: dict, attn_type: str) -> tuple[list[str], list[int]]:
    names = cell["encoder_tasks"] if attn_type in ENCODER_TYPES else cell["decoder_tasks"]
    return names, [cell["task_names"].index(n) for n in names]


def shared_heads_plot(cells: list[dict], title: str, path: Path) -> Path | None:
    """Mean over seeds of the shared-heads matrix, per attention type with more than one task on its side."""
    if not cells or not cells[0]["selection"]:
        return None
    panels = [t for t in cells[0]["selection"] if len(_side_rows(cells[0], t)[0]) > 1]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.2), squeeze=False)
    for ax, attn_type in zip(axes[0], panels, strict=True):
        names, idx = _side_rows(cells[0], attn_type)
        mats = [shared_heads(c["selection"][attn_type], c["pool_heads"], idx) for c in cells]
        m = np.mean(mats, axis=0)
        per_task = m.diagonal()[0]  # L x H, the same for every task
        ax.imshow(m / per_task, cmap="Blues", vmin=0, vmax=1)
        for a in range(len(names)):
            for b in range(len(names)):
                ax.text(b, a, f"{m[a, b]:.0f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, fontsize=7, rotation=90)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=7)
        ax.set_title(f"{attn_type} (of {per_task:.0f} heads)", fontsize=8)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def head_load_plot(cells_by_variant: dict[str, list[dict]], title: str, path: Path) -> Path | None:
    """Per attention type: how many pool heads (all layers, mean over seeds) are used by exactly n tasks."""
    variants = {v: cs for v, cs in cells_by_variant.items() if cs and cs[0]["selection"]}
    if not variants:
        return None
    types = list(next(iter(variants.values()))[0]["selection"])
    fig, axes = plt.subplots(1, len(types), figsize=(3.3 * len(types), 3.0), squeeze=False)
    width = 0.8 / len(variants)
    for ax, attn_type in zip(axes[0], types, strict=True):
        for i, (variant, cs) in enumerate(variants.items()):
            _, idx = _side_rows(cs[0], attn_type)
            hist = np.mean([load_histogram(c["selection"][attn_type], c["pool_heads"], idx) for c in cs], axis=0)
            n = np.arange(len(hist))
            ax.bar(n + (i - (len(variants) - 1) / 2) * width, hist, width, label=variant,
                   color=COLORS.get(variant.split("_h")[0]))
        ax.set_xlabel("tasks using the head", fontsize=8)
        ax.set_ylabel("pool heads (all layers)", fontsize=8)
        ax.set_title(attn_type, fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)
