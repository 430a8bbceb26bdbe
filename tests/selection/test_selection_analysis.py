"""Shared-heads matrix and head load of a selection table (hs_scale.selection.analysis), on tables worked out by
hand and on a real selector's table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hs_scale.selection.analysis import concat_layers, head_load, load_histogram, selection_masks, shared_heads
from hs_scale.selection.selector import HeadSelector

# 3 tasks, 2 layers, pool of 4, H = 2
TABLE = [
    [[0, 1], [2, 3]],  # task a
    [[0, 2], [2, 3]],  # task b
    [[1, 3], [0, 1]],  # task c
]


def test_shared_heads_by_hand():
    m = shared_heads(TABLE, pool_heads=4)
    # a-b: layer 0 share {0}, layer 1 share {2, 3} -> 3; a-c: {1} + {} -> 1; b-c: {} + {} -> 0
    assert m.tolist() == [[4, 3, 1], [3, 4, 0], [1, 0, 4]]
    assert m.dtype == np.int64
    assert np.array_equal(shared_heads(TABLE), m)  # pool size inferred from the largest head


def test_head_load_and_histogram_by_hand():
    load = head_load(TABLE, pool_heads=4)
    assert load.tolist() == [[2, 2, 1, 1], [1, 1, 2, 2]]
    hist = load_histogram(TABLE, pool_heads=4)
    assert hist.tolist() == [0, 4, 4, 0]  # no head unused, 4 used by one task, 4 by two, none by all three
    assert hist.sum() == 2 * 4


def test_task_subset_and_unused_heads():
    m = shared_heads(TABLE, pool_heads=4, tasks=[0, 1])
    assert m.tolist() == [[4, 3], [3, 4]]
    hist = load_histogram(TABLE, pool_heads=4, tasks=[0, 1])
    # layer 0: heads 0 (2 tasks), 1 (1), 2 (1), 3 (0); layer 1: 2 and 3 by both, 0 and 1 by none
    assert hist.tolist() == [3, 2, 3]


def test_concat_layers_adds_the_layers_of_each_type():
    both = concat_layers([TABLE, TABLE])
    assert len(both[0]) == 4
    assert np.array_equal(shared_heads(both, 4), 2 * shared_heads(TABLE, 4))
    assert np.array_equal(load_histogram(both, 4), 2 * load_histogram(TABLE, 4))


def test_real_group_selector_invariants():
    torch.manual_seed(0)
    K, L, P, H = 5, 3, 8, 4
    table = HeadSelector(num_tasks=K, num_layers=L, pool_heads=P, active_heads=H, strategy="group").table()
    m = shared_heads(table, P)
    assert np.array_equal(m, m.T)
    assert np.all(np.diag(m) == L * H)
    assert np.all(m <= L * H)
    load = head_load(table, P)
    assert np.all(load.sum(axis=1) == K * H)  # every task uses H heads per layer
    # group strategy: exactly one head per group of r = 2 per task -> the two heads of a group share K tasks
    assert np.all(load.reshape(L, H, P // H).sum(axis=2) == K)
    assert load_histogram(table, P).sum() == L * P


def test_bad_tables_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="outside a pool of 2"):
        selection_masks(TABLE, pool_heads=2)
    with pytest.raises(ValueError, match="task index 3"):
        shared_heads(TABLE, 4, tasks=[3])
    with pytest.raises(ValueError, match="empty selection table"):
        head_load([], 4)
    with pytest.raises(ValueError, match="different numbers of tasks"):
        concat_layers([TABLE, TABLE[:2]])
