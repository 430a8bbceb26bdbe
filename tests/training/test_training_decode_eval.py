"""Decoding metrics at evaluation during training (train.eval_decode_utterances, hs_scale.training.decode_eval).

The WER / BLEU per task a real training run logs (metrics.jsonl, console, TensorBoard, W&B offline, end-of-run
summary) equal `hs-scale evaluate` on the checkpoint of that step over the same utterances; the same under DP=2
(each rank decodes its share); decoding changes nothing in training; pipeline parallelism skips it with one line.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hs_scale.config import load_config
from hs_scale.evaluation.cli import main as evaluate_main
from hs_scale.training.decode_eval import skip_reason

ROOT = Path(__file__).resolve().parents[2]
WORDS = {
    "de": "der die das haus datei fenster öffnen schließen speichern drucken neu alt".split(),
    "fr": "le la les maison fichier fenêtre ouvrir fermer enregistrer imprimer nouveau vieux".split(),
    "en": "the a file window open close save print new old big small".split(),
}
UTTERANCES, MAX_LEN = 3, 16  # utterances decoded per task (the dev split holds 12-24 per task), length cap


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory):
    """de / fr sentences with English translations, both directions (text, no audio): 12 dev pairs per
    direction, 48 dev sentences in all."""
    from data_pipelines.build import build_from_rows

    rnd = random.Random(0)
    rows = []
    for lang in ("de", "fr"):
        for split, n in (("train", 24), ("dev", 12)):
            for _ in range(n):
                k = rnd.randint(1, 3)
                text, en = (" ".join(rnd.choice(WORDS[w]) for _ in range(k)) for w in (lang, "en"))
                rows.append(dict(split=split, lang=lang, tgt_lang="en", domain="ui", text=text, translation=en))
                rows.append(dict(split=split, lang="en", tgt_lang=lang, domain="ui", text=en, translation=text))
    out = str(tmp_path_factory.mktemp("decode_corpus") / "corpus")
    build_from_rows(rows, out, modality="text", shard_size=8, workers=1, vocab_size=60)
    return out


def _args(corpus: str, out: Path, *extra: str) -> list[str]:
    from hs_scale.data import load_tokenizer

    # mt.yaml shrunk; a tiny lr keeps the model near its random init, so it writes words rather than </s> at once.
    return ["--config", str(ROOT / "configs" / "mt.yaml"), f"--data.manifest={corpus}",
            f"--model.vocab_size={load_tokenizer(corpus).vocab_size}", "--model.d_model=32", "--model.ffn_dim=64",
            "--model.encoder_layers=1", "--model.decoder_layers=1", "--model.dropout=0.0", "--data.num_workers=0",
            "--data.max_tokens_per_batch=96", "--data.max_target_tokens=32", "--data.max_source_tokens=32",
            "--train.steps=6", "--train.warmup_steps=1", "--train.lr=1e-5", "--train.eval_every=3",
            "--train.save_every=3", "--train.log_every=3", "--train.progress_bar=false", "--train.threads=1",
            f"--train.eval_decode_utterances={UTTERANCES}", f"--train.eval_decode_max_len={MAX_LEN}",
            f"--train.output_dir={out}", *extra]


def _evals(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["kind"] == "eval"}


def _evaluate(checkpoint: Path, tmp_path: Path, *extra: str) -> dict:
    """`hs-scale evaluate` on `checkpoint` over the utterances training decodes."""
    path = tmp_path / f"eval_{checkpoint.name}.json"
    assert evaluate_main(["--checkpoint", str(checkpoint), "--split", "dev", "--beam", "1", "--max-len-b",
                          str(MAX_LEN), "--utterances-per-task", str(UTTERANCES), "--quiet", "--keep-outputs",
                          "--out", str(path), *extra]) == 0
    return json.loads(path.read_text())


def _assert_logged_equals_evaluate(out: Path, tmp_path: Path, metric: str, tasks: set[str]) -> None:
    evals = _evals(out)
    assert sorted(evals) == [3, 6]
    for step, logged in evals.items():
        reference = _evaluate(out / "checkpoints" / f"step_{step:09d}", tmp_path)
        assert reference["metric"] == metric
        assert set(logged[f"{metric}_per_task"]) == tasks == set(reference["scores"])
        assert logged[f"{metric}_per_task"] == reference["scores"], step  # the same floats
        assert logged[metric] == reference["average"]
        assert logged["decode_utterances"] == reference["total_sentences"]
        assert all(n >= UTTERANCES for n in reference["num_sentences"].values())
        assert reference["total_sentences"] < 48, "the subset is the whole split: --utterances-per-task untested"
        # A real comparison: the model writes words, not just </s>.
        hyps = [o["hyp"] for outputs in reference["outputs"].values() for o in outputs]
        assert sum(bool(h.strip()) for h in hyps) > len(hyps) // 2, hyps


def test_logged_wer_equals_evaluate_and_reaches_every_log(text_corpus, tmp_path, capsys, monkeypatch):
    """One process, ASR-like (target = the source text: WER per language): metrics.jsonl, console, TensorBoard,
    W&B offline and the end-of-run summary carry the scores `hs-scale evaluate` gives on each checkpoint."""
    from hs_scale.training.run import train

    wandb = pytest.importorskip("wandb") is not None
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    cfg = load_config(ROOT / "configs" / "mt.yaml",
                      _args(text_corpus, out, "--data.target=transcript", "--train.wandb=offline")[2:])
    train(cfg)
    printed = capsys.readouterr().out
    _assert_logged_equals_evaluate(out, tmp_path, "wer", {"de", "fr", "en"})
    last = _evals(out)[6]
    assert any(v > 0 for v in last["wer_per_task"].values())  # real errors, not an empty comparison
    # The console line of each evaluation and the end-of-run summary.
    assert f"wer_per_task/de={last['wer_per_task']['de']:.4g}" in printed
    assert f"dev WER per task ({last['decode_utterances']} utterances):" in printed
    assert f"average {last['wer']:.2f}" in printed
    # TensorBoard scalars.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (out / "tensorboard").glob("events.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    tb = acc.Scalars("eval/wer_per_task/de")
    assert [(e.step, round(e.value, 4)) for e in tb] == [(s, round(_evals(out)[s]["wer_per_task"]["de"], 4))
                                                         for s in (3, 6)]
    # W&B offline: the history keys are in the run's record file.
    if wandb:
        (log,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
        data = log.read_bytes()
        for key in (b"eval/wer", b"eval/wer_per_task/de", b"eval/wer_per_task/fr", b"eval/decode_utterances"):
            assert key in data, key


def test_decoding_changes_nothing_in_training(tmp_path):
    """Dropout on, evaluation every 2 steps: the training losses and final weights with decoding on equal those
    with it off, bitwise (decoding draws no random numbers and touches no training data state)."""
    from hs_scale.checkpoint import load_full_model_state
    from hs_scale.training.run import train

    runs = {}
    for n in (0, 8):
        out = tmp_path / f"decode_{n}"
        cfg = load_config(ROOT / "configs" / "synthetic.yaml", [
            "--train.steps=6", "--train.eval_every=2", "--train.log_every=1", "--train.progress_bar=false",
            "--train.threads=1", "--model.dropout=0.1", "--model.d_model=32", "--model.ffn_dim=64",
            "--synthetic.batch_size=16", f"--train.eval_decode_utterances={n}", f"--train.output_dir={out}"])
        train(cfg)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[n] = ([r["loss"] for r in rows if r["kind"] == "train"],
                   [r.get("sequence_accuracy_per_task") for r in rows if r["kind"] == "eval"],
                   load_full_model_state(out / "checkpoints")[1])
    (losses_off, decoded_off, state_off), (losses_on, decoded_on, state_on) = runs[0], runs[8]
    assert losses_on == losses_off and len(losses_on) == 6
    assert decoded_off == [None] * 3 and all(set(d) == {"copy", "reverse", "shift", "swap_pairs"} for d in decoded_on)
    assert all(torch.equal(state_on[k], state_off[k]) for k in state_off)


def test_first_utterances_takes_whole_batches_until_each_task_has_n():
    """Splits are stored task by task: the subset holds n utterances of every task, in whole batches, skips
    padding batches and batches of tasks already full, and stops reading once every task has n."""
    from types import SimpleNamespace

    from hs_scale.evaluation.evaluate import first_utterances

    def batch(*tasks, padding=False):
        return SimpleNamespace(tgt_task=torch.tensor(tasks), is_padding=padding)

    batches = [batch(0, 0, 0), batch(0, 0), batch(0, 0), batch(1, 1), batch(1, 1, padding=True), batch(1, 1),
               batch(1, 2), batch(2, 2), batch(2, 2)]
    read = []

    def loader():  # a generator, as a corpus loader is: records how far it was read
        for b in batches:
            read.append(b)
            yield b

    picked = list(first_utterances(batches, 4))  # a list: its tasks are read from the batches
    assert picked == [batches[i] for i in (0, 1, 3, 5, 6, 7, 8)]  # 5 of task 0, 4 + 1 of task 1, 5 of task 2
    assert list(first_utterances(batches, 0)) == [b for b in batches if not b.is_padding]

    class Loader:  # a corpus loader has metadata: reading stops once every task of the split has n
        meta = SimpleNamespace(tgt_task=torch.tensor([0, 1]))

        def __iter__(self):
            return loader()

    assert list(first_utterances(Loader(), 2)) == [batches[0], batches[3]]
    assert len(read) == 5  # read up to the batch after task 1's first: then every task had 2


def test_pipeline_parallel_and_lm_skip_decoding():
    synthetic = ROOT / "configs" / "synthetic.yaml"
    message = skip_reason(load_config(synthetic, ["--parallel.pipeline_parallel=2"]))
    assert "pipeline parallelism" in message and "hs-scale evaluate" in message and "\n" not in message
    assert skip_reason(load_config(synthetic)) is None  # decodes
    assert skip_reason(load_config(synthetic, ["--parallel.pipeline_parallel=2",
                                               "--train.eval_decode_utterances=0"])) is None  # off: nothing to say
    assert skip_reason(load_config(ROOT / "configs" / "lm_demo.yaml")) is None  # perplexity only, by design
    with pytest.raises(Exception, match="eval_decode_utterances=-1"):
        load_config(synthetic, ["--train.eval_decode_utterances=-1"])


@pytest.mark.slow
def test_data_parallel_bleu_equals_evaluate(text_corpus, tmp_path):
    """DP=2 over gloo (megatron DDP): each rank decodes every other batch of the subset; the gathered BLEU per
    target language equals `hs-scale evaluate` on the checkpoints, in one process."""
    out = tmp_path / "dp2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "hs_scale.cli", "train", *_args(text_corpus, out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_logged_equals_evaluate(out, tmp_path, "bleu", {"de", "fr", "en"})
    assert "dev BLEU per task" in proc.stdout


def _tp_search_worker(rank: int, world_size: int) -> dict:
    import copy
    from types import SimpleNamespace

    from support.models import PAD, small_s2t

    from hs_scale.evaluation.search import SearchConfig, generate
    from hs_scale.parallel.api import parallelize_model
    from hs_scale.parallel.layout import ParallelConfig, init_parallel_groups
    from hs_scale.training.decode_eval import TensorParallelSearchModel

    parallel = ParallelConfig(tensor_parallel=2)
    groups = init_parallel_groups(parallel, seed=0)
    torch.manual_seed(0)
    dense = small_s2t("group")
    (chunk,) = parallelize_model(copy.deepcopy(dense), parallel, groups)
    g = torch.Generator().manual_seed(3)
    batch = SimpleNamespace(features=torch.randn(5, 14, 8, generator=g),
                            feature_lengths=torch.tensor([14, 9, 12, 6, 14]), src_task=torch.tensor([0, 1, 2, 0, 1]),
                            tgt_task=torch.tensor([2, 1, 0, 0, 1]), decoder_input=torch.full((5, 1), 2))
    result = {}
    for beam in (1, 3):
        search = SearchConfig(beam=beam, max_len_b=8)
        ref, got = generate(dense, batch, search), generate(TensorParallelSearchModel(chunk, groups.tp), batch, search)
        result[beam] = {"same_tokens": ref.tokens == got.tokens, "tokens": got.tokens,
                        "score_err": max(abs(a - b) for a, b in zip(ref.scores, got.scores, strict=True))}
    assert PAD not in {t for row in result[1]["tokens"] for t in row}
    return result


@pytest.mark.slow
def test_tensor_parallel_search_equals_one_process():
    """TP2: both ranks run the search over their shards (logits all-gathered over TP) and pick the tokens one
    process picks, greedy and beam 3, with the same scores up to float rounding."""
    pytest.importorskip("megatron.core")
    from support.harness import run_distributed

    ranks = run_distributed(_tp_search_worker, 2, timeout_s=180)
    for beam in (1, 3):
        assert all(r[beam]["same_tokens"] for r in ranks), beam
        assert all(r[beam]["score_err"] < 1e-4 for r in ranks), [r[beam]["score_err"] for r in ranks]
        assert ranks[0][beam]["tokens"] == ranks[1][beam]["tokens"]
        assert any(len(row) > 0 for row in ranks[0][beam]["tokens"])  # not only </s>
