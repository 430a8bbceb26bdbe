"""The one step engine under TP2, PP2 and TP2 x PP2 (gloo ranks running `hs_scale.training.run.train`) logs what
one process logs, for the encoder-decoder (arch text, synthetic task) and the decoder-only LM (arch lm, packed
multilingual documents, GQA head selection; see VIRTUAL and VARIANTS): the loss curve with the KL prior on
(selection.kl_weight > 0), the per-task losses, the final evaluation per task, the selection table and its heatmap.
The final checkpoint loads at the layout that saved it (a freshly initialised engine evaluates as the run did) and
consolidates in one process into the single-device model holding the one-process weights. With
train.weight_decay > 0, AdamW decays no selector logit, bias or norm on any layout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

from support.harness import run_distributed  # noqa: E402

# Small models (heads, pool and layers split over TP2 x PP2), the KL prior and weight decay on, two micro-batches
# per step (pipeline schedule and gradient accumulation), label smoothing.
OVERRIDES = ["--train.steps=3", "--train.log_every=1", "--train.eval_every=0", "--train.warmup_steps=0",
             "--train.progress_bar=false", "--train.threads=1", "--train.grad_accum=2", "--train.lr=3e-3",
             "--train.weight_decay=0.1", "--train.label_smoothing=0.1", "--selection.kl_weight=0.05"]
TEXT = ["--model.d_model=32", "--model.ffn_dim=64", "--synthetic.batch_size=8", "--synthetic.eval_batches=1"]
# The LM: 4 query slots over 2 KV heads (one per TP rank), r = 2 candidates, 4 layers, tied embeddings, rows
# packing documents of several languages.
LM = ["--model.hidden_size=32", "--model.intermediate_size=64", "--model.num_layers=4", "--model.num_heads=4",
      "--model.num_kv_heads=2", "--model.attention_backend=sdpa", "--data.seq_len=32",
      "--data.max_tokens_per_batch=128", "--data.num_workers=0"]
SELECTORS = {"text": 3, "lm": 1}  # selectors of one model: encoder, decoder, cross / the LM's decoder_self
# The LM's TP2 x PP2 run is interleaved (2 virtual chunks per stage, one layer each): TP x PP and the interleaved
# schedule in one run, whose final evaluation (3 batches, not a multiple of pp) also checks forward-only
# interleaving. The encoder-decoders' interleaved pipeline is tested in tests/parallel/test_parallel_pipeline.py.
VIRTUAL = {("lm", 2, 2): 2}
# The LM's TP2 run unties its embeddings (a vocab-parallel LM head of its own; PP2 and TP2 x PP2 keep lm_demo's tied
# head, a second embedding copy on the last stage). Its reference is a one-process run of the same variant.
VARIANTS = {("lm", 2, 1): ["--model.tie_embeddings=false"]}


def _config(run: dict, out: str, tp: int = 1, pp: int = 1, variant: tuple = ()):
    """run: {"arch", "corpus" (lm), "vocab" (lm)}; variant: model overrides (VARIANTS)."""
    from hs_scale.config import load_config

    layout = [f"--parallel.tensor_parallel={tp}", f"--parallel.pipeline_parallel={pp}", *variant]
    if (run["arch"], tp, pp) in VIRTUAL:
        layout.append(f"--parallel.virtual_pipeline={VIRTUAL[run['arch'], tp, pp]}")
    if run["arch"] == "text":
        return load_config("configs/synthetic.yaml", [*OVERRIDES, *TEXT, f"--train.output_dir={out}", *layout])
    data = [f"--data.manifest={run['corpus']}", f"--model.vocab_size={run['vocab']}"]
    return load_config("configs/lm_demo.yaml", [*OVERRIDES, *LM, *data, f"--train.output_dir={out}", *layout])


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


def _worker(rank: int, world_size: int, run: dict, out: str, tp: int, pp: int) -> dict:
    from hs_scale.models import build_model
    from hs_scale.parallel.api import parallelize_model
    from hs_scale.parallel.layout import current_groups
    from hs_scale.training.run import train

    cfg = _config(run, out, tp, pp, VARIANTS.get((run["arch"], tp, pp), ()))
    result = train(cfg)
    reloaded = _reload_and_evaluate(cfg, run["tasks"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.selection, num_tasks=run["tasks"])
    return {"result": result, "reloaded": reloaded,
            "decay": _decay_check(parallelize_model(model, cfg.parallel, current_groups()), cfg)}


def _reload_and_evaluate(cfg, num_tasks: int) -> dict:
    """A fresh engine at this layout (another init) loads the run's final checkpoint; its evaluation per task."""
    from hs_scale.checkpoint import CheckpointManager
    from hs_scale.models import build_model
    from hs_scale.parallel.layout import current_groups
    from hs_scale.training.data_source import build_source
    from hs_scale.training.engine import StepEngine

    groups = current_groups()
    torch.manual_seed(1)
    model = build_model(cfg.model, cfg.selection, num_tasks=num_tasks)
    engine = StepEngine(model, cfg.train, cfg.selection, cfg.parallel, groups, num_tasks, torch.device("cpu"))
    CheckpointManager(Path(cfg.train.output_dir) / "checkpoints").load_latest(
        engine.checkpoint_model, engine.optimizer, groups=groups)
    source = build_source(cfg.data, cfg.synthetic, groups.dp_rank, groups.dp_size, cfg.train.grad_accum)
    return engine.evaluate(source.eval_batches(), source.task_names)["nll_per_task"]


def _train_log(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def _run(arch: str, tmp_path_factory) -> dict:
    """What a run of `arch` needs besides its layout: the LM's corpus (built once) and vocabulary, the task count."""
    if arch == "text":
        return {"arch": arch, "tasks": len(_config({"arch": arch}, "unused").synthetic.rules)}
    sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
    from lm_helpers import ALPHABETS, build_tiny_lm_corpus

    from hs_scale.data import load_tokenizer

    # 121 pieces: TP2 pads the vocabulary to 122 rows (padded_vocab_size), which consolidation and export drop.
    corpus = build_tiny_lm_corpus(str(tmp_path_factory.mktemp("lm_corpus")), vocab_size=121)
    return {"arch": arch, "tasks": len(ALPHABETS), "corpus": corpus, "vocab": load_tokenizer(corpus).vocab_size}


@pytest.fixture(scope="module", params=["text", "lm"])
def single(request, tmp_path_factory) -> tuple[dict, Path]:
    """The one-process run every layout of an arch is compared with."""
    from hs_scale.models import build_model
    from hs_scale.training.run import train

    run = _run(request.param, tmp_path_factory)
    out = tmp_path_factory.mktemp(f"single_{request.param}")
    cfg = _config(run, str(out))
    train(cfg)
    torch.manual_seed(0)
    decay = _decay_check([build_model(cfg.model, cfg.selection, num_tasks=run["tasks"])], cfg)
    assert decay == {"selectors": SELECTORS[run["arch"]], "no_decay_kept": True, "matrices_decayed": True}, decay
    return run, out


def _check_checkpoint_reshards(run: dict, single: Path, out: Path, variant) -> None:
    """The layout's final checkpoint, consolidated in one process, loads into the single-device model (every key,
    strict) and holds the one-process run's weights (up to float reassociation of the TP sums)."""
    from hs_scale.checkpoint.manager import load_full_model_state
    from hs_scale.models import build_model

    cfg = _config(run, str(out), variant=variant)
    model = build_model(cfg.model, cfg.selection, num_tasks=run["tasks"])
    _, ref = load_full_model_state(single / "checkpoints", like=model)
    _, got = load_full_model_state(out / "checkpoints", like=model)
    model.load_state_dict(got)
    assert set(got) == set(ref)
    for name, tensor in ref.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    if run["arch"] == "lm":  # what `hs-scale export-hf` reads: the training checkpoint of any layout
        from hs_scale.export.lm_cli import load_lm

        exported, tasks, _ = load_lm(out / "checkpoints")
        assert len(tasks) == run["tasks"] and exported.embed_tokens.weight.shape[0] == run["vocab"]
        torch.testing.assert_close(exported.state_dict(), model.state_dict(), rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2xpp2"])
def test_layout_logs_what_one_process_logs(single, tmp_path, tp, pp):
    run, single = single
    variant = VARIANTS.get((run["arch"], tp, pp), ())
    if variant:  # the one-process reference of this model variant
        from hs_scale.training.run import train

        single = tmp_path / "single"
        train(_config(run, str(single), variant=variant))
    out = tmp_path / "layout"
    ranks = run_distributed(_worker, tp * pp, args=(run, str(out), tp, pp), timeout_s=300)
    ref, got = _train_log(single), _train_log(out)
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
    assert (out / "selection.txt").read_text() == (single / "selection.txt").read_text()
    heatmaps = sorted(p.name for p in (out / "heatmaps").glob("*.png"))
    assert heatmaps == sorted(p.name for p in (single / "heatmaps").glob("*.png")) and heatmaps
    assert (out / "heatmaps" / heatmaps[-1]).read_bytes() == (single / "heatmaps" / heatmaps[-1]).read_bytes()
    assert ranks[0]["reloaded"] == pytest.approx(final["nll_per_task"], rel=1e-6)  # loads at its own layout
    _check_checkpoint_reshards(run, single, out, variant)
    for r in ranks:  # every rank's chunks: selector slices and 1-d parameters in the no-decay group
        assert r["decay"]["no_decay_kept"] and r["decay"]["matrices_decayed"], r["decay"]
    assert sum(r["decay"]["selectors"] for r in ranks) >= SELECTORS[run["arch"]]
