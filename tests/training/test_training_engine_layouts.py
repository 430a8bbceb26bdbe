"""The one step engine under TP2, PP2 and TP2 x PP2 (gloo ranks running `hs_scale.training.run.train`) logs what
one process logs: the loss curve with the KL prior on (selection.kl_weight > 0), the per-task losses, the final
evaluation per task, the selection table and its heatmap. With train.weight_decay > 0, AdamW decays no selector
logit, bias or norm on any layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

from support.harness import run_distributed  # noqa: E402

# A small text model (heads, pool and layers split over TP2 x PP2), the KL prior and weight decay on, two
# micro-batches per step (pipeline schedule and gradient accumulation), label smoothing.
OVERRIDES = ["--train.steps=3", "--train.log_every=1", "--train.eval_every=0", "--train.warmup_steps=0",
             "--train.progress_bar=false", "--train.threads=1", "--train.grad_accum=2", "--train.lr=3e-3",
             "--train.weight_decay=0.1", "--train.label_smoothing=0.1", "--selection.kl_weight=0.05",
             "--model.d_model=32", "--model.ffn_dim=64", "--synthetic.batch_size=8", "--synthetic.eval_batches=1"]


def _config(out: str, tp: int = 1, pp: int = 1):
    from hs_scale.config import load_config

    layout = [f"--parallel.tensor_parallel={tp}", f"--parallel.pipeline_parallel={pp}"]
    return load_config("configs/synthetic.yaml", [*OVERRIDES, f"--train.output_dir={out}", *layout])


def _decay_check(modules: list, cfg) -> dict:
    """One AdamW step from fresh state with zero gradients moves only the decayed parameters (by lr x wd)."""
    from hs_scale.selection.selector import HeadSelector
    from hs_scale.training.optim import build_optimizer

    optimizer, _ = build_optimizer(modules, cfg.train)
    selector = {id(p) for m in modules for s in m.modules() if isinstance(s, HeadSelector) for p in s.parameters()}
    params = [p for m in modules for p in m.parameters()]
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    kept = [torch.equal(b, p) for b, p in zip(before, params, strict=True)]
    return {
        "selectors": sum(id(p) in selector for p in params),
        "no_decay_kept": all(k for p, k in zip(params, kept, strict=True) if p.ndim < 2 or id(p) in selector),
        "matrices_decayed": all(not k for p, k in zip(params, kept, strict=True)
                                if p.ndim >= 2 and id(p) not in selector),
    }


def _worker(rank: int, world_size: int, out: str, tp: int, pp: int) -> dict:
    from hs_scale.models import build_model
    from hs_scale.parallel.api import parallelize_model
    from hs_scale.parallel.layout import current_groups
    from hs_scale.training.run import train

    cfg = _config(out, tp, pp)
    result = train(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.selection, num_tasks=len(cfg.synthetic.rules))
    return {"result": result, "decay": _decay_check(parallelize_model(model, cfg.parallel, current_groups()), cfg)}


def _train_log(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The one-process run every layout is compared with."""
    from hs_scale.models import build_model
    from hs_scale.training.run import train

    out = tmp_path_factory.mktemp("single")
    cfg = _config(str(out))
    train(cfg)
    torch.manual_seed(0)
    decay = _decay_check([build_model(cfg.model, cfg.selection, num_tasks=len(cfg.synthetic.rules))], cfg)
    assert decay == {"selectors": 3, "no_decay_kept": True, "matrices_decayed": True}, decay
    return out


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2xpp2"])
def test_layout_logs_what_one_process_logs(single, tmp_path, tp, pp):
    ranks = run_distributed(_worker, tp * pp, args=(str(tmp_path), tp, pp), timeout_s=300)
    ref, got = _train_log(single), _train_log(tmp_path)
    assert [r["step"] for r in got] == [1, 2, 3]
    for a, b in zip(ref, got, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)  # the KL prior trains identically
        assert set(b["nll_per_task"]) == set(a["nll_per_task"])
        assert b["nll_per_task"] == pytest.approx(a["nll_per_task"], rel=1e-5)
        assert b["tflops_per_s"] > 0
    final_ref = json.loads((single / "result.json").read_text())
    final = ranks[0]["result"]
    assert final["nll_per_task"] == pytest.approx(final_ref["nll_per_task"], rel=1e-5)
    assert final["selection_changes"] == final_ref["selection_changes"]
    assert (tmp_path / "selection.txt").read_text() == (single / "selection.txt").read_text()
    heatmaps = sorted(p.name for p in (tmp_path / "heatmaps").glob("*.png"))
    assert heatmaps == sorted(p.name for p in (single / "heatmaps").glob("*.png")) and heatmaps
    assert (tmp_path / "heatmaps" / heatmaps[-1]).read_bytes() == (single / "heatmaps" / heatmaps[-1]).read_bytes()
    for r in ranks:  # every rank's chunks: selector slices and 1-d parameters in the no-decay group
        assert r["decay"]["no_decay_kept"] and r["decay"]["matrices_decayed"], r["decay"]
    assert sum(r["decay"]["selectors"] for r in ranks) >= 3
