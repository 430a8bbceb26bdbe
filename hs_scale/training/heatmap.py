"""Heatmap of the selected heads: one panel per (attention type, layer), rows = tasks, columns = pool heads.

A cell is lit when the task uses that pool head (deterministic selection). Columns shared by many rows are the
"head load" of the paper's analysis figures; rows that share few cells are languages that got their own heads.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def selection_matrix(table: list[list[list[int]]], layer: int, pool_heads: int) -> np.ndarray:
    """uint8 [K tasks, P pool heads]: 1 where task k selects the head in `layer`."""
    m = np.zeros((len(table), pool_heads), dtype=np.uint8)
    for k, per_layer in enumerate(table):
        m[k, per_layer[layer]] = 1
    return m


def heatmap_figure(tables: dict[str, list[list[list[int]]]], task_names: list[str], pool_heads: int, title: str = ""):
    rows = len(tables)
    cols = max(len(t[0]) for t in tables.values())
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 + 0.35 * pool_heads * cols, 0.6 + 0.3 * len(task_names) * rows),
                             squeeze=False)
    for r, (attn_type, table) in enumerate(tables.items()):
        for layer in range(cols):
            ax = axes[r][layer]
            if layer >= len(table[0]):
                ax.axis("off")
                continue
            ax.imshow(selection_matrix(table, layer, pool_heads), cmap="Blues", vmin=0, vmax=1, aspect="auto")
            ax.set_title(f"{attn_type} L{layer}", fontsize=8)
            ax.set_xticks(range(pool_heads))
            ax.set_xticklabels(range(pool_heads), fontsize=6)
            ax.set_yticks(range(len(task_names)))
            ax.set_yticklabels(task_names if layer == 0 else [], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def write_heatmap(path: str | Path, tables, task_names, pool_heads: int, title: str = "", tb_writer=None,
                  step: int = 0) -> Path:
    """Write the PNG (and the same figure to TensorBoard when a SummaryWriter is given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = heatmap_figure(tables, task_names, pool_heads, title)
    fig.savefig(path, dpi=110)
    if tb_writer is not None:
        tb_writer.add_figure("selection/heatmap", fig, step)
    plt.close(fig)
    return path


def count_changes(old: dict | None, new: dict) -> int:
    """(task, layer, slot) entries whose selected head differs between two selection tables."""
    if old is None:
        return 0
    changed = 0
    for attn_type, table in new.items():
        for k, per_layer in enumerate(table):
            for layer, heads in enumerate(per_layer):
                changed += sum(a != b for a, b in zip(heads, old[attn_type][k][layer], strict=True))
    return changed
