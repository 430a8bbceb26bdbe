"""evaluate(): batching, task grouping, padding batches, report and JSON; average_checkpoints().

Legend: B batch, S source length, L target length.
"""

from __future__ import annotations

import json

import pytest
import torch

from hs_scale.data.batch import Batch
from hs_scale.evaluation.evaluate import average_checkpoints, evaluate, reference_ids, write_results
from hs_scale.evaluation.metrics import bleu, wer
from hs_scale.models import ModelConfig, build_model
from hs_scale.selection.config import SelectionConfig

TASKS = ["de", "fr", "ru"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster, and far faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        arch="text",
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        num_heads=2,
        ffn_dim=32,
        vocab_size=20,
        dropout=0.0,
        init_std=0.1,
    )
    return build_model(cfg, SelectionConfig(pool_heads=4), len(TASKS))


def text_batch(seed, B=5, is_padding=False):
    """Mixed-task text batch; targets are random ids then </s> (2), padded with <pad> (1)."""
    g = torch.Generator().manual_seed(seed)
    tasks = torch.randint(len(TASKS), (B,), generator=g)
    src = torch.randint(7, 20, (B, 6), generator=g)
    tgt_len = torch.randint(1, 5, (B,), generator=g)
    target = torch.full((B, 6), 1, dtype=torch.long)
    dec = torch.full((B, 6), 1, dtype=torch.long)
    for b, n in enumerate(tgt_len.tolist()):
        target[b, :n] = torch.randint(7, 20, (n,), generator=g)
        target[b, n] = 2
        dec[b, 0] = 4 + int(tasks[b])
        dec[b, 1 : n + 1] = target[b, :n]
    return Batch(
        keys=[f"b{seed}-{i}" for i in range(B)],
        decoder_input=dec,
        target=target,
        target_lengths=tgt_len + 1,
        src_task=tasks,
        tgt_task=tasks.clone(),
        num_target_tokens=int(tgt_len.sum()) + B,
        source_tokens=src,
        source_lengths=torch.full((B,), 6),
        is_padding=is_padding,
    )


def words(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


def test_reference_ids_stop_at_eos():
    target = torch.tensor([[5, 6, 2, 1], [2, 1, 1, 1], [7, 8, 9, 2]])
    assert reference_ids(target, eos_id=2, pad_id=1) == [[5, 6], [], [7, 8, 9]]


@pytest.mark.parametrize("metric", ["wer", "bleu", "accuracy"])
def test_evaluate_report_matches_metrics_on_outputs(metric, tmp_path):
    model = tiny_model()
    batches = [text_batch(1), text_batch(2), text_batch(3, is_padding=True)]
    result = evaluate(model, batches, words, TASKS, metric, beam=2, max_len_b=4, keep_outputs=True)
    n_real = sum(len(b) for b in batches if not b.is_padding)
    assert result["total_sentences"] == n_real  # the padding batch is skipped
    assert list(result["scores"]) == [t for t in TASKS if t in result["scores"]]  # vocabulary order
    kept_keys = sorted(p["key"] for pairs in result["outputs"].values() for p in pairs)
    assert kept_keys == sorted(k for b in batches if not b.is_padding for k in b.keys)  # each utterance, by key
    for task, pairs in result["outputs"].items():
        hyps, refs = [p["hyp"] for p in pairs], [p["ref"] for p in pairs]
        assert result["num_sentences"][task] == len(pairs)
        if metric == "wer":
            assert result["scores"][task] == pytest.approx(wer(hyps, refs))
        elif metric == "bleu":
            assert result["scores"][task] == pytest.approx(bleu(hyps, refs)[0])
        else:
            assert isinstance(hyps[0], list)
    scores = list(result["scores"].values())
    assert result["average"] == pytest.approx(sum(scores) / len(scores))
    assert "average" in result["table"] and metric.upper() in result["table"]
    path = write_results(result, tmp_path / "out" / "eval.json")
    assert json.loads(path.read_text())["scores"] == pytest.approx(result["scores"])


def test_evaluate_groups_by_source_or_target_task():
    model = tiny_model()
    batch = text_batch(4, B=6)
    batch.tgt_task = torch.zeros(6, dtype=torch.long)  # every row decodes "de"
    by_tgt = evaluate(model, [batch], words, TASKS, "accuracy", beam=1, max_len_b=3)
    by_src = evaluate(model, [batch], words, TASKS, "accuracy", beam=1, max_len_b=3, group_by="src_task")
    assert by_tgt["num_sentences"] == {"de": 6}
    assert sum(by_src["num_sentences"].values()) == 6 and len(by_src["num_sentences"]) > 1


def test_average_checkpoints_values_and_dtypes():
    sds = [
        {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([1.0], dtype=torch.bfloat16), "draws": torch.tensor(3)},
        {"w": torch.tensor([3.0, 6.0]), "h": torch.tensor([2.0], dtype=torch.bfloat16), "draws": torch.tensor(7)},
    ]
    avg = average_checkpoints(sds)
    assert torch.equal(avg["w"], torch.tensor([2.0, 4.0]))
    assert avg["h"].dtype == torch.bfloat16 and float(avg["h"]) == 1.5
    assert int(avg["draws"]) == 7  # integer buffers come from the last checkpoint


def test_average_checkpoints_of_a_model_loads_strictly():
    models = [tiny_model(seed) for seed in range(3)]
    avg = average_checkpoints([m.state_dict() for m in models])
    target = tiny_model(9)
    target.load_state_dict(avg, strict=True)
    key = "decoder.embed_tokens.weight"
    expected = sum(m.state_dict()[key] for m in models) / 3
    torch.testing.assert_close(target.state_dict()[key], expected)


def test_average_checkpoints_refuses_mismatches():
    with pytest.raises(ValueError, match="at least one"):
        average_checkpoints([])
    with pytest.raises(ValueError, match="different keys"):
        average_checkpoints([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])
    with pytest.raises(ValueError, match="a: state dict 0"):
        average_checkpoints([{"a": torch.zeros(2)}, {"a": torch.zeros(3)}])


def test_resolve_checkpoints_picks_last_complete(tmp_path):
    from hs_scale.evaluation.cli import resolve_checkpoints

    for step in (100, 200, 300, 400):
        folder = tmp_path / f"step_{step:09d}"
        folder.mkdir()
        if step != 400:  # the newest save did not finish: no COMPLETE marker
            (folder / "COMPLETE").write_text("{}")
    picked = resolve_checkpoints(None, str(tmp_path), 2, verify=False)  # fake markers: see tests/reliability
    assert [p.name for p in picked] == ["step_000000200", "step_000000300"]
    assert [str(p) for p in resolve_checkpoints(["x", "y"], None, 1)] == ["x", "y"]
    with pytest.raises(ValueError, match="must be >= 1"):
        resolve_checkpoints(None, str(tmp_path), 0)
