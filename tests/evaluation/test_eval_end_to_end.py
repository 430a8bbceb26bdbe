"""Train the text model on the synthetic task (copy / reverse), then decode it greedy and with beam 5, directly and
through the `hs-scale evaluate` code path (checkpoint reading injected: the CLI's only untested line is the import).

Legend: B batch, L length, V vocabulary.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from hs_scale.config import Config
from hs_scale.data.synthetic import PAD, SyntheticConfig, SyntheticTask
from hs_scale.evaluation.cli import build_parser, main, run
from hs_scale.evaluation.evaluate import evaluate
from hs_scale.evaluation.search import SearchConfig, beam_search, greedy_search
from hs_scale.models import ModelConfig, build_model
from hs_scale.selection.config import SelectionConfig
from hs_scale.training.config import TrainConfig

STEPS, WARMUP = 600, 20


@pytest.fixture(scope="module")
def trained():
    """configs/synthetic.yaml shrunk to two rules and short sequences: ~10 s of CPU on one thread.

    The loop is written out here (Adam, warm-up + cosine, clipping) so that this test depends on the model and
    the data only, not on the trainer's interface.
    """
    threads = torch.get_num_threads()
    # NOTE: one thread: these matrices are tiny, and two threads on a busy 2-core machine are several times slower.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    synthetic = SyntheticConfig(
        rules=["copy", "reverse"],
        num_symbols=8,
        min_len=2,
        max_len=6,
        batch_size=64,
        homogeneous_batches=True,
        eval_batches=1,
    )
    model_cfg = ModelConfig(
        arch="text",
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        num_heads=2,
        ffn_dim=128,
        vocab_size=synthetic.vocab_size,
        dropout=0.0,
        init_std=0.1,
    )
    selection = SelectionConfig(strategy="group", pool_heads=4, temperature=5.0)
    model = build_model(model_cfg, selection, num_tasks=2)
    task = SyntheticTask(synthetic)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3, betas=(0.9, 0.98), eps=1e-6)

    def lr_factor(step):
        if step < WARMUP:
            return (step + 1) / WARMUP
        return 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    model.train()
    for step in range(STEPS):
        b = task.batch(step)
        logits_BLV = model(b.source_tokens, b.decoder_input, b.src_task, b.tgt_task)
        loss = F.cross_entropy(logits_BLV.flatten(0, 1), b.target.flatten(), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    # Held-out batches mix both tasks within a batch (training saw one task per batch).
    mixed = SyntheticTask(SyntheticConfig(**{**synthetic.__dict__, "homogeneous_batches": False}))
    eval_batches = [mixed.batch(i, "valid") for i in range(2)]
    config = Config(
        model=model_cfg,
        selection=selection,
        synthetic=synthetic,
        train=TrainConfig(steps=STEPS, lr=5e-3, schedule="cosine", warmup_steps=WARMUP),
    )
    yield model, eval_batches, config
    torch.set_num_threads(threads)


@pytest.mark.parametrize("beam", [1, 5])
def test_trained_model_decodes_every_task(trained, beam):
    model, batches, config = trained
    result = evaluate(
        model, batches, str, config.synthetic.task_names, "accuracy", beam=beam, max_len_a=1.0, max_len_b=2
    )
    assert set(result["scores"]) == {"copy", "reverse"}
    assert all(n > 20 for n in result["num_sentences"].values())
    for task, acc in result["scores"].items():
        assert acc >= 95.0, (task, result["table"])


def test_beam_scores_at_least_greedy_on_trained_model(trained):
    model, batches, _ = trained
    for lp in (0.0, 1.0):
        greedy = greedy_search(model, batches[0], SearchConfig(beam=1, max_len_a=1.0, max_len_b=2, length_penalty=lp))
        beam = beam_search(model, batches[0], SearchConfig(beam=5, max_len_a=1.0, max_len_b=2, length_penalty=lp))
        assert all(b >= g - 1e-5 for b, g in zip(beam.scores, greedy.scores, strict=True))


def test_cli_path_averages_checkpoints_and_writes_json(trained, tmp_path, capsys):
    model, _, config = trained
    state = {k: v.clone() for k, v in model.state_dict().items()}
    noisy = {k: (v + 0.5 if v.is_floating_point() else v) for k, v in state.items()}
    # Two fake checkpoints whose mean is the trained model: (state - 0.5 + state + 0.5) / 2.
    stored = {"a": {k: (v - 0.5 if v.is_floating_point() else v) for k, v in state.items()}, "b": noisy}
    calls = []

    def load_fn(path, like=None):
        calls.append((str(path), like is not None))
        return config.to_dict(), stored[str(path)]

    out = tmp_path / "eval.json"
    argv = [
        "--checkpoint",
        "a",
        "--checkpoint",
        "b",
        "--beam",
        "5",
        "--max-len-a",
        "1",
        "--max-len-b",
        "2",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    assert main(argv, load_fn=load_fn) == 0
    assert ("b", True) in calls  # every checkpoint is fitted to the model built from the config
    written = json.loads(out.read_text())
    assert written["metric"] == "accuracy" and written["checkpoints"] == ["a", "b"]
    assert written["search"]["beam"] == 5
    assert all(acc >= 95.0 for acc in written["scores"].values())
    assert "average" in capsys.readouterr().out
    # One checkpoint alone is far from the trained model: averaging is what makes it decode well.
    alone = run(build_parser().parse_args(argv[:2] + argv[4:-2]), load_fn=load_fn)
    assert alone["average"] < written["average"]


def test_cli_refuses_bad_arguments(capsys):
    assert main(["--checkpoint", "x", "--beam", "0"]) == 2
    assert "--beam 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--split", "valid"])  # no checkpoint given
