"""Figures for head analysis (matplotlib, Agg backend: files only, no display).

    plot_scores(scores, out_dir, sets)          <lang>.png per language + all_languages.png: LAHIS heatmaps [L x H]
    plot_ablation(ablation, path)               the cross-language ablation matrix (rows: evaluated, cols: masked)
    plot_selection(table, pool_heads, names, out_dir)   shared_heads.png and load_histogram.png
        of a trained selection model (Gong et al. 2021, Figs 3-4; via hs_scale.selection.analysis)
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

from hs_scale.selection import analysis as sel  # noqa: E402


def _heatmap(ax, values, title, xlabel, ylabel, marks=(), cmap="viridis"):
    image = ax.imshow(values, aspect="auto", cmap=cmap, interpolation="nearest")
    for layer, head in marks:
        ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return image


def plot_scores(scores: dict, out_dir: str, sets: dict | None = None) -> list[str]:
    """Heatmap of each language's LAHIS matrix (red boxes: its specific heads); returns the files written."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    specific = (sets or {}).get("specific", {})
    for lang, s in scores.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        fig.colorbar(_heatmap(ax, np.asarray(s, dtype=float), f"LAHIS {lang}", "head", "layer",
                              specific.get(lang, ())), ax=ax)
        path = os.path.join(out_dir, f"{lang}.png")
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    cols = min(4, len(scores))
    rows = math.ceil(len(scores) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, (lang, s) in zip(axes.flat, scores.items(), strict=False):
        _heatmap(ax, np.asarray(s, dtype=float), lang, "head", "layer", specific.get(lang, ()))
    for ax in list(axes.flat)[len(scores):]:
        ax.axis("off")
    path = os.path.join(out_dir, "all_languages.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [*written, path]


def plot_ablation(ablation: dict, path: str) -> str:
    """Perplexity ratio ppl(a | b's heads masked) / ppl(a): the paper's dark diagonal (darker = larger)."""
    ratio = np.asarray(ablation["ratio"], dtype=float)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * ratio.shape[1], 0.8 + 0.6 * ratio.shape[0]))
    fig.colorbar(_heatmap(ax, ratio, f"ppl ratio (diag/off-diag increase {ablation['diag_over_offdiag']:.2f})",
                          "masked heads of", "evaluated language", cmap="Greys"), ax=ax)
    ax.set_xticks(range(len(ablation["masked"])), ablation["masked"])
    ax.set_yticks(range(len(ablation["languages"])), ablation["languages"])
    for (i, j), v in np.ndenumerate(ratio):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                color="white" if v > ratio.mean() else "black")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_selection(table, pool_heads: int, names: Sequence[str], out_dir: str,
                   tasks: Sequence[int] | None = None) -> list[str]:
    """Shared-heads matrix between task pairs (Fig. 3) and head-load histogram (Fig. 4) of a selection table."""
    os.makedirs(out_dir, exist_ok=True)
    shared = sel.shared_heads(table, pool_heads, tasks)
    hist = sel.load_histogram(table, pool_heads, tasks)
    labels = [names[k] for k in (range(len(table)) if tasks is None else tasks)]
    fig, ax = plt.subplots(figsize=(1 + 0.5 * len(labels), 0.8 + 0.5 * len(labels)))
    fig.colorbar(_heatmap(ax, shared, "heads shared by each pair of tasks", "task", "task", cmap="Blues"), ax=ax)
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_yticks(range(len(labels)), labels)
    first = os.path.join(out_dir, "shared_heads.png")
    fig.savefig(first, dpi=100, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(range(len(hist)), hist)
    ax.set_xlabel("number of tasks using the head")
    ax.set_ylabel("pool heads (all layers)")
    second = os.path.join(out_dir, "load_histogram.png")
    fig.savefig(second, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return [first, second]
