"""What a trained selector chose, summarised as in the paper's analysis figures (Gong et al. 2021, Figs 3-4).

A *selection table* is what ``HeadSelector.table()`` (or ``model.head_selection_table()[attention_type]``) returns:
``table[task][layer]`` = the pool heads that task selects in that layer (H heads out of H', slot order).
Legend: K tasks, L layers, P = H' pool heads per layer.

    shared_heads(table)                 int64 [K, K]  heads shared by each pair of tasks (Fig. 3)
    head_load(table, pool_heads)        int64 [L, P]  number of tasks that use each pool head
    load_histogram(table, pool_heads)   int64 [K + 1] number of pool heads used by exactly n tasks (Fig. 4)
    concat_layers([table_a, table_b])   one table whose layers are table_a's then table_b's (e.g. all attention types)

Every function accepts a subset of tasks (``tasks=[k, ...]``): a selector holds a row for every task of the
vocabulary, but a side may never see some of them (the encoder of X->en translation never sees "en"), and those
rows are only the untrained initial choice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Table = Sequence[Sequence[Sequence[int]]]


def _rows(table: Table, tasks: Sequence[int] | None) -> list[Sequence[Sequence[int]]]:
    if not table:
        raise ValueError("empty selection table: it needs at least one task")
    picked = range(len(table)) if tasks is None else tasks
    for k in picked:
        if not 0 <= k < len(table):
            raise ValueError(f"task index {k} is outside the table's {len(table)} tasks")
    layers = {len(table[k]) for k in picked}
    if len(layers) != 1:
        raise ValueError(f"tasks of one table must have the same number of layers, got {sorted(layers)}")
    return [table[k] for k in picked]


def selection_masks(table: Table, pool_heads: int, tasks: Sequence[int] | None = None) -> np.ndarray:
    """bool [K, L, P]: True where task k selects pool head p in layer l."""
    rows = _rows(table, tasks)
    masks = np.zeros((len(rows), len(rows[0]), pool_heads), dtype=bool)
    for k, per_layer in enumerate(rows):
        for layer, heads in enumerate(per_layer):
            heads = np.asarray(heads, dtype=np.int64)
            if heads.size and (heads.min() < 0 or heads.max() >= pool_heads):
                raise ValueError(f"task {k} layer {layer} selects heads {heads.tolist()} outside a pool of "
                                 f"{pool_heads}; pass the selector's pool size (selection.pool_heads)")
            masks[k, layer, heads] = True
    return masks


def shared_heads(table: Table, pool_heads: int | None = None, tasks: Sequence[int] | None = None) -> np.ndarray:
    """int64 [K, K]: entry (a, b) = number of (layer, pool head) pairs selected by both task a and task b.

    Summed over layers; the diagonal is what each task selects in all (L x H). Divide by L x H for the fraction
    of a task's heads it shares. ``pool_heads`` defaults to the largest head index in the table + 1.
    """
    if pool_heads is None:
        pool_heads = 1 + max(h for row in _rows(table, tasks) for heads in row for h in heads)
    m_KX = selection_masks(table, pool_heads, tasks).reshape(len(_rows(table, tasks)), -1).astype(np.int64)
    return m_KX @ m_KX.T


def head_load(table: Table, pool_heads: int, tasks: Sequence[int] | None = None) -> np.ndarray:
    """int64 [L, P]: how many of the tasks select each pool head of each layer."""
    return selection_masks(table, pool_heads, tasks).sum(axis=0, dtype=np.int64)


def load_histogram(table: Table, pool_heads: int, tasks: Sequence[int] | None = None) -> np.ndarray:
    """int64 [K + 1]: entry n = number of (layer, pool head) pairs used by exactly n of the K tasks.

    Entry 0 counts unused heads; the entries sum to L x P. The paper's Fig. 4 plots this over all layers.
    """
    load_LP = head_load(table, pool_heads, tasks)
    num_tasks = len(_rows(table, tasks))
    return np.bincount(load_LP.ravel(), minlength=num_tasks + 1).astype(np.int64)


def concat_layers(tables: Sequence[Table]) -> list[list[list[int]]]:
    """One table with the layers of every input table in turn (all must hold the same tasks)."""
    if not tables:
        raise ValueError("concat_layers needs at least one table")
    num_tasks = {len(t) for t in tables}
    if len(num_tasks) != 1:
        raise ValueError(f"tables hold different numbers of tasks: {sorted(num_tasks)}")
    return [[list(heads) for t in tables for heads in t[k]] for k in range(len(tables[0]))]
