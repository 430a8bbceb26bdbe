"""`hs-scale demo` (what `make demo` runs): a small multilingual ASR run with group head selection, end to end.

1. builds the `demo` corpus (speech synthesized with espeak-ng in de, fr, es; three acoustic conditions) unless
   it is already there and verifies;
2. trains a small S2T model with group head selection on 2 CPU processes (torchrun, megatron DDP);
3. evaluates the average of the last checkpoints per language with beam search (WER);
4. writes a report with the WER table, the selected heads (text and heatmap) and where everything went.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo_asr.yaml"


def _build_corpus(corpus: Path, size: int, vocab_size: int) -> dict:
    from data_pipelines.cli import main as prepare_data

    info = corpus / "info.json"
    if info.exists() and prepare_data(["--verify", "--out", str(corpus)]) == 0:
        print(f"[demo] corpus {corpus} already built and verified")
    elif prepare_data(["--recipe", "demo", "--out", str(corpus), "--size", str(size),
                       "--vocab-size", str(vocab_size)]) != 0:
        raise SystemExit("[demo] building the corpus failed (see above)")
    return json.loads(info.read_text())


def _train(corpus: Path, run_dir: Path, nproc: int, extra: list[str]) -> None:
    from hs_scale.data import load_tokenizer

    tok = load_tokenizer(str(corpus))
    hs = ["-m", "hs_scale.cli", "train", "--config", str(CONFIG), f"--data.manifest={corpus}",
          f"--train.output_dir={run_dir}", f"--model.vocab_size={tok.vocab_size}", *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *hs]
    print("[demo] " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _report(out: Path, info: dict, evaluation: dict, timings: dict, run_dir: Path) -> Path:
    heatmaps = sorted((run_dir / "heatmaps").glob("*.png"))
    selection = (run_dir / "selection.txt").read_text() if (run_dir / "selection.txt").exists() else ""
    lines = [
        "# hs_scale demo: multilingual ASR with group head selection", "",
        f"Corpus: {info['num_samples']} utterances, {info['hours']:.2f} h of synthesized speech, languages "
        f"{', '.join(info['params']['langs'])}, conditions {', '.join(info['domains'])}.", "",
        "| stage | seconds |", "|---|---|", *[f"| {k} | {v:.0f} |" for k, v in timings.items()], "",
        "## WER per language (test split, beam 5, average of the last checkpoints)", "",
        "```", evaluation["table"], "```", "",
        "## Selected heads (task x layer -> pool heads)", "", "```", selection.rstrip(), "```", "",
        f"Heatmap: {heatmaps[-1] if heatmaps else '(none)'}", "",
        f"Training outputs: {run_dir} (config.yaml, metrics.jsonl, tensorboard/, checkpoints/)",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hs-scale demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="where the corpus, run and report go")
    parser.add_argument("--size", type=int, default=3000, help="training utterances in the corpus")
    parser.add_argument("--vocab-size", type=int, default=1000, help="SentencePiece pieces of the corpus tokenizer")
    parser.add_argument("--nproc", type=int, default=2, help="training processes (data parallel)")
    parser.add_argument("--average-last", type=int, default=3, help="checkpoints averaged for evaluation")
    args, extra = parser.parse_known_args(argv)
    out = Path(args.out)
    run_dir = out / "train"
    timings: dict[str, float] = {}
    start = time.perf_counter()
    info = _build_corpus(out / "corpus", args.size, args.vocab_size)
    timings["build corpus"] = time.perf_counter() - start
    t = time.perf_counter()
    _train(out / "corpus", run_dir, args.nproc, extra)
    timings["train (2 processes)"] = time.perf_counter() - t

    from hs_scale.evaluation.cli import main as evaluate

    t = time.perf_counter()
    eval_json = out / "eval_test.json"
    code = evaluate(["--checkpoint-root", str(run_dir / "checkpoints"), "--average-last", str(args.average_last),
                     "--split", "test", "--beam", "5", "--metric", "wer", "--out", str(eval_json)])
    if code != 0:
        return code
    timings["evaluate"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start
    report = _report(out, info, json.loads(eval_json.read_text()), timings, run_dir)
    print(report.read_text())
    print(f"[demo] report: {report}\n[demo] corpus: {out / 'corpus'}\n[demo] run: {run_dir}\n"
          f"[demo] evaluation: {eval_json}\n[demo] TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}")
    return 0
