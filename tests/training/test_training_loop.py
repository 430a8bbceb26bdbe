"""The single-process trainer: it learns the synthetic task, skips non-finite steps, refuses bad vocabularies."""

from __future__ import annotations

import json

import pytest
import torch

from hs_scale.config import load_config
from hs_scale.models import build_model
from hs_scale.training.data_source import SyntheticSource
from hs_scale.training.engine import StepEngine
from hs_scale.training.loop import NonFiniteLossError, Trainer
from hs_scale.training.run import train


def _trainer(cfg):
    source = SyntheticSource(cfg.synthetic, 0, 1, cfg.train.grad_accum)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.selection, num_tasks=len(source.task_names))
    engine = StepEngine(model, cfg.train, cfg.selection, cfg.parallel, None, len(source.task_names),
                        torch.device("cpu"))
    return Trainer(cfg.train, cfg.selection, engine, source, None, None, cfg.to_dict(), True)


@pytest.mark.slow
def test_synthetic_multilingual_task_reaches_near_perfect_accuracy(tmp_path):
    """The issue's bar: near-perfect accuracy on the built-in multilingual task (about 40 s on 2 idle cores)."""
    cfg = load_config("configs/synthetic.yaml", [f"--train.output_dir={tmp_path}", "--train.progress_bar=false",
                                                 "--train.eval_every=0"])
    result = train(cfg)
    assert result["token_accuracy"] >= 0.99, result["token_accuracy_per_task"]
    assert min(result["token_accuracy_per_task"].values()) >= 0.98
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if r["kind"] == "train"]
    assert losses[-1] < losses[0] / 10
    assert (tmp_path / "selection.txt").read_text().count("copy") == 3  # one row per selected attention type
    assert list((tmp_path / "heatmaps").glob("*.png"))


def test_non_finite_steps_are_skipped_then_stop_the_run():
    cfg = load_config("configs/synthetic.yaml", ["--train.max_nonfinite_steps=3", "--train.steps=10"])
    trainer = _trainer(cfg)
    poison = {"on": False}
    trainer.engine.checkpoint_model.register_forward_hook(lambda m, i, out: out * float("nan") if poison["on"] else out)
    trainer.train_step()
    before = {n: p.detach().clone() for n, p in trainer.engine.checkpoint_model.named_parameters()}
    poison["on"] = True
    assert trainer.train_step()["skipped"]
    assert trainer.step == 1 and trainer.skipped_steps == 1
    params = trainer.engine.checkpoint_model.named_parameters()
    assert all(torch.equal(before[n], p) for n, p in params), "a skipped step changed parameters"
    poison["on"] = False
    assert not trainer.train_step().get("skipped")  # a good step resets the streak
    poison["on"] = True
    trainer.train_step()
    trainer.train_step()
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps had a non-finite loss"):
        trainer.train_step()


def test_grad_accumulation_equals_one_big_batch():
    """Two micro-batches of 32 == one batch of 64 (token-mean over the whole step).

    Selection is off here: every forward is one Gumbel draw by design, so two micro-batches see two draws.
    """
    torch.manual_seed(0)
    base = ["--train.steps=1", "--train.warmup_steps=0", "--train.clip_norm=0", "--model.dropout=0.0",
            "--selection.enabled=false"]
    cfg_big = load_config("configs/synthetic.yaml", base + ["--synthetic.batch_size=64"])
    cfg_acc = load_config("configs/synthetic.yaml", base + ["--synthetic.batch_size=32", "--train.grad_accum=2"])
    big, acc = _trainer(cfg_big), _trainer(cfg_acc)
    acc.engine.checkpoint_model.load_state_dict(big.engine.checkpoint_model.state_dict())
    halves = acc.source.next_microbatches()
    whole = _concat(halves)
    big.source.next_microbatches = lambda: [whole]
    acc.source.next_microbatches = lambda: halves
    grads = {}
    for name, trainer in (("big", big), ("acc", acc)):
        step = trainer.engine.optimizer.step

        def recording_step(*a, _name=name, _trainer=trainer, _step=step, **k):
            grads[_name] = [p.grad.clone() for p in _trainer.engine.checkpoint_model.parameters()]
            return _step(*a, **k)

        trainer.engine.optimizer.step = recording_step
    r_big, r_acc = big.train_step(), acc.train_step()
    assert r_big["loss"] == pytest.approx(r_acc["loss"], rel=1e-6)
    names = [n for n, _ in big.engine.checkpoint_model.named_parameters()]
    for n, g_big, g_acc in zip(names, grads["big"], grads["acc"], strict=True):
        torch.testing.assert_close(g_big, g_acc, atol=1e-7, rtol=1e-5, msg=n)


def _concat(batches):
    from hs_scale.data.batch import Batch, pad_ids

    def rows(t):
        return [r[r != 1].tolist() for b in batches for r in getattr(b, t)]

    keys = [k for b in batches for k in b.keys]
    dec, tgt, src = pad_ids(rows("decoder_input"), 1), pad_ids(rows("target"), 1), pad_ids(rows("source_tokens"), 1)
    cat = torch.cat
    return Batch(keys=keys, decoder_input=dec, target=tgt, target_lengths=cat([b.target_lengths for b in batches]),
                 src_task=cat([b.src_task for b in batches]), tgt_task=cat([b.tgt_task for b in batches]),
                 num_target_tokens=sum(b.num_target_tokens for b in batches), source_tokens=src,
                 source_lengths=cat([b.source_lengths for b in batches]))


def test_activation_checkpointing_gives_the_same_step(monkeypatch):
    """Recomputing layers in backward changes memory, not the update (dropout on: same RNG replay)."""
    base = ["--train.steps=1", "--model.dropout=0.1"]
    plain = _trainer(load_config("configs/synthetic.yaml", base))
    ckpt = _trainer(load_config("configs/synthetic.yaml", base + ["--train.activation_checkpointing=true"]))
    ckpt.engine.checkpoint_model.load_state_dict(plain.engine.checkpoint_model.state_dict())
    model = ckpt.engine.checkpoint_model
    assert model.encoder.checkpoint_activations and model.decoder.checkpoint_activations
    from hs_scale.models import layers

    calls, forward = [], layers.EncoderLayer.forward
    monkeypatch.setattr(layers.EncoderLayer, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    torch.manual_seed(0)
    r_plain = plain.train_step()
    plain_calls = len(calls)
    torch.manual_seed(0)
    r_ckpt = ckpt.train_step()
    assert len(calls) - plain_calls == 2 * plain_calls, "checkpointing must recompute every layer in backward"
    assert r_plain["loss"] == r_ckpt["loss"]
    for (n, p), q in zip(plain.engine.checkpoint_model.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6, msg=n)
