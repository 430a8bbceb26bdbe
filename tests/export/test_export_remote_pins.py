"""The remote-code model (standalone: it ships with exported models) restates three things of the package: the
head gather, the attention sites and the task parsing. These tests pin each copy to the package's one."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from hs_scale.export.remote.modeling_hs_scale import PooledProjection, _ActiveTask  # noqa: E402
from hs_scale.selection.attention import gather_heads  # noqa: E402


@pytest.mark.parametrize("bias", [True, False])
def test_remote_pooled_projection_is_the_package_gather(bias):
    torch.manual_seed(0)
    D, P, d, K = 16, 8, 4, 3
    heads_per_task = [[1, 2, 5, 7], [0, 3, 4, 6], [7, 6, 1, 0]]  # slot order, not sorted: order matters
    active = _ActiveTask(K)
    proj = PooledProjection(D, P, d, heads_per_task, active, side="target")
    if not bias:
        proj.bias = None
    torch.nn.init.normal_(proj.weight)
    x = torch.randn(2, 5, D)
    for task, heads in enumerate(heads_per_task):
        active.ids = (0, task)
        w, b = gather_heads(proj.weight, proj.bias, torch.tensor(heads), d)
        assert w.shape == (len(heads) * d, D)
        assert torch.equal(proj(x), torch.nn.functional.linear(x, w, b))
        # The gathered rows really are the pool heads' blocks, in slot order.
        assert torch.equal(w[d : 2 * d], proj.weight[heads[1] * d : (heads[1] + 1) * d])


def test_gather_of_several_tasks_stacks_the_single_task_gathers():
    torch.manual_seed(1)
    weight, bias, d = torch.randn(8 * 4, 16), torch.randn(8 * 4), 4
    heads_GH, w_GH = torch.tensor([[0, 3, 5, 6], [1, 2, 4, 7]]), torch.rand(2, 4)
    W, b = gather_heads(weight, bias, heads_GH, d, w_GH)
    for g in range(2):
        Wg, bg = gather_heads(weight, bias, heads_GH[g], d, w_GH[g])
        assert torch.equal(W[g], Wg) and torch.equal(b[g], bg)


def test_remote_attention_sites_are_the_package_sites():
    from hs_scale.export.remote.modeling_hs_scale import _ATTENTION
    from hs_scale.selection.sites import SITES

    assert _ATTENTION == {name: (s.stack, s.attr, s.side) for name, s in SITES.items()}


def test_remote_task_parsing_is_the_package_parsing():
    from types import SimpleNamespace

    from hs_scale.export.materialize import parse_task
    from hs_scale.export.remote.modeling_hs_scale import _HeadSelectionMixin

    names = ["de", "fr", "en"]
    model = SimpleNamespace(config=SimpleNamespace(task_names=names))
    for task in ("fr", "de->en", " en -> fr ", ("fr", "de")):
        assert _HeadSelectionMixin.task_ids(model, task) == parse_task(task, names)
    for bad in ("xx", "de->xx"):
        with pytest.raises(ValueError, match="unknown task 'xx'"):
            _HeadSelectionMixin.task_ids(model, bad)
        with pytest.raises(ValueError, match="unknown task 'xx'"):
            parse_task(bad, names)
