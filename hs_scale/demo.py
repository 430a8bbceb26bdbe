"""`hs-scale demo` (what `make demo` runs): does head selection train a working model, and does it pay?

1. builds the `demo` corpus (spoken numbers, digit strings and dates in de, fr, es, synthesized with espeak-ng
   under clean / noisy / fast conditions) unless it is already there and verifies;
2. trains, side by side with the same data, active heads and step budget (one process and one thread each), the
   group head-selection model of configs/demo_asr.yaml and its shared-attention baseline (selection off);
3. evaluates both on the test split per language (beam search, average of the last checkpoints, WER);
4. writes report.md (WER per language for both models, the difference, which model won, the selected heads),
   learning_curves.png, the group model's heatmap, and summary.json for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo_asr.yaml"
MODELS = {"group": [], "shared": ["--selection.enabled=false"]}


def _build_corpus(corpus: Path, size: int | None) -> dict:
    from data_pipelines.cli import main as prepare_data

    info = corpus / "info.json"
    if info.exists() and prepare_data(["--verify", "--out", str(corpus)]) == 0:
        print(f"[demo] corpus {corpus} already built and verified", flush=True)
    else:
        args = ["--recipe", "demo", "--out", str(corpus), "--workers", str(os.cpu_count() or 1)]
        if prepare_data(args + (["--size", str(size)] if size else [])) != 0:
            raise SystemExit("[demo] building the corpus failed (see above)")
    return json.loads(info.read_text())


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "hs_scale.cli", *args], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=env)


def _last(path: Path, kind: str) -> dict | None:
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("kind") == kind]
    return rows[-1] if rows else None


def _wait(procs: dict[str, subprocess.Popen], out: Path, what: str, steps: int | None = None) -> None:
    """Wait for every process, printing one progress line every 30 s; fail with the log's tail if one fails."""
    while any(p.poll() is None for p in procs.values()):
        time.sleep(1.0 if steps is None else 30.0)
        if steps is not None and any(p.poll() is None for p in procs.values()):
            parts = []
            for name in procs:
                last = _last(out / name / "metrics.jsonl", "train")
                parts.append(f"{name} step {last['step']}/{steps} loss {last['loss']:.3f}" if last else f"{name} -")
            print(f"[demo] {what}: " + " | ".join(parts), flush=True)
    for name, p in procs.items():
        if p.returncode != 0:
            log = out / name / f"{what}.log"
            tail = "\n".join(log.read_text().splitlines()[-25:]) if log.exists() else ""
            raise SystemExit(f"[demo] {what} of the {name} model failed (exit {p.returncode}); {log}:\n{tail}")


def _train(corpus: Path, out: Path, vocab_size: int, extra: list[str]) -> int:
    from hs_scale.config import load_config

    steps = load_config(str(CONFIG), extra).train.steps
    procs = {}
    for name, flags in MODELS.items():
        if (out / name).exists():  # the demo owns these runs: start both models fresh, never resume half of them
            print(f"[demo] removing the previous run {out / name}", flush=True)
            shutil.rmtree(out / name)
        args = ["train", "--config", str(CONFIG), f"--data.manifest={corpus}", f"--train.output_dir={out / name}",
                f"--model.vocab_size={vocab_size}", "--train.progress_bar=false", *flags, *extra]
        print("[demo] hs-scale " + " ".join(args), flush=True)
        procs[name] = _spawn(args, out / name / "train.log")
    _wait(procs, out, "train", steps)
    return steps


def _evaluate(out: Path, average_last: int, beam: int) -> dict[str, dict]:
    procs = {name: _spawn(["evaluate", "--checkpoint-root", str(out / name / "checkpoints"), "--average-last",
                           str(average_last), "--split", "test", "--beam", str(beam), "--metric", "wer",
                           "--out", str(out / name / "eval_test.json")], out / name / "evaluate.log")
             for name in MODELS}
    _wait(procs, out, "evaluate")
    return {name: json.loads((out / name / "eval_test.json").read_text()) for name in MODELS}


def _curves(out: Path) -> Path:
    """learning_curves.png: training loss and dev nll of both models against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name in MODELS:
        rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines() if x.strip()]
        train = [r for r in rows if r["kind"] == "train"]
        dev = [r for r in rows if r["kind"] == "eval" and "nll" in r]
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label=name)
        axes[1].plot([r["step"] for r in dev], [r["nll"] for r in dev], marker="o", label=name)
    axes[0].set(title="training loss (CE + CTC)", xlabel="step")
    axes[1].set(title="dev nll per token (teacher-forced)", xlabel="step")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "learning_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _wer_table(evals: dict[str, dict]) -> tuple[list[str], dict[str, dict[str, float]]]:
    wer = {name: {**e["scores"], "average": e["average"]} for name, e in evals.items()}
    counts = {**evals["group"]["num_sentences"], "average": evals["group"]["total_sentences"]}
    lines = ["| language | test utterances | group WER | shared WER | group - shared |", "|---|---|---|---|---|"]
    for t in [*sorted(evals["group"]["scores"]), "average"]:
        g, s = wer["group"][t], wer["shared"][t]
        lines.append(f"| {t} | {counts[t]} | {g:.2f} | {s:.2f} | {g - s:+.2f} |")
    return lines, wer


def _report(out: Path, info: dict, evals: dict, timings: dict, steps: int, curves: Path) -> Path:
    lines, wer = _wer_table(evals)
    g, s = wer["group"]["average"], wer["shared"]["average"]
    verdict = ("group head selection won" if g < s else "the shared-attention baseline won" if s < g else "a tie")
    heatmaps = sorted((out / "group" / "heatmaps").glob("*.png"))
    selection = out / "group" / "selection.txt"
    report = [
        "# hs_scale demo: multilingual ASR, group head selection vs the shared-attention baseline", "",
        f"Corpus: {info['num_samples']} utterances ({info['splits']}), {info['hours']:.2f} h of synthesized speech "
        f"(spoken numbers, digit strings, dates), languages {', '.join(info['params']['langs'])}, conditions "
        f"{', '.join(info['domains'])}. Both models: the same data, {steps} steps, one process each; group selects "
        "H=4 of H'=8 heads per language in every attention, shared uses the same 4 heads for every language.", "",
        f"**Result: {verdict}** (average test WER group {g:.2f} vs shared {s:.2f}, beam 5, average of the last "
        "checkpoints).", "", *lines, "",
        "| stage | seconds |", "|---|---|", *[f"| {k} | {v:.0f} |" for k, v in timings.items()], "",
        "## Selected heads of the group model (task x layer -> pool heads)", "", "```",
        selection.read_text().rstrip() if selection.exists() else "(none)", "```", "",
        *([f"![selected heads of the group model]({heatmaps[-1].relative_to(out)})", ""] if heatmaps else []),
        "## Learning curves", "", f"![learning curves]({curves.relative_to(out)})", "",
        f"Runs: {out / 'group'}, {out / 'shared'} (config.yaml, metrics.jsonl, tensorboard/, checkpoints/)",
    ]
    path = out / "report.md"
    path.write_text("\n".join(report) + "\n")
    summary = {"models": {name: {"wer": wer[name], "checkpoints": str(out / name / "checkpoints")} for name in MODELS},
               "winner": "group" if g < s else "shared" if s < g else "tie", "steps": steps,
               "wall_s": {k: round(v, 1) for k, v in timings.items()},
               "corpus": {k: info[k] for k in ("num_samples", "splits", "hours")}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hs-scale demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="where the corpus, runs and report go")
    parser.add_argument("--size", type=int, help="training utterances in the corpus (recipe default: 4800)")
    parser.add_argument("--average-last", type=int, default=3, help="checkpoints averaged for evaluation")
    parser.add_argument("--beam", type=int, default=5, help="beam size for the test evaluation (1 = greedy)")
    args, extra = parser.parse_known_args(argv)
    out = Path(args.out).resolve()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    info = _build_corpus(out / "corpus", args.size)
    timings["build corpus"] = time.perf_counter() - start

    from hs_scale.data import load_tokenizer

    t = time.perf_counter()
    steps = _train(out / "corpus", out, load_tokenizer(str(out / "corpus")).vocab_size, extra)
    timings["train (both models, side by side)"] = time.perf_counter() - t
    t = time.perf_counter()
    evals = _evaluate(out, args.average_last, args.beam)
    timings["evaluate (both models)"] = time.perf_counter() - t
    curves = _curves(out)
    timings["total"] = time.perf_counter() - start
    report = _report(out, info, evals, timings, steps, curves)
    print(report.read_text())
    print(f"[demo] report: {report}\n[demo] summary: {out / 'summary.json'}\n[demo] TensorBoard: tensorboard "
          f"--logdir {out}")
    return 0
