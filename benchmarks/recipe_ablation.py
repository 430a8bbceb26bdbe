"""Speech recipe ablation: each change to the demo recipe and its effect on dev WER at a fixed budget.

    python benchmarks/recipe_ablation.py --corpus runs/demo/corpus --steps 1000          # every variant
    python benchmarks/recipe_ablation.py --corpus runs/demo/corpus --variant ctc0.3 --variant no_ctc
    python benchmarks/recipe_ablation.py --smoke                                          # tiny corpus, 4 steps

Every variant trains configs/demo_asr.yaml with its overrides for the same number of steps on the same corpus (one
process, one thread; two variants run at once on a 2-core machine), then decodes the dev split greedily with the
average of the last 3 checkpoints. Prints a markdown table (dev WER per language and average, training wall
seconds) and writes JSON (--json). The budget is in steps, not seconds, so a busy machine changes the time, not
the result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "demo_asr.yaml"

# name -> (what changes against the demo recipe, overrides). The first is the demo recipe itself.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "demo": ("the demo recipe (configs/demo_asr.yaml)", []),
    "no_ctc": ("attention-only objective (ctc_weight 0)", ["--model.ctc_weight=0"]),
    "ctc0.5": ("CTC weight 0.5", ["--model.ctc_weight=0.5"]),
    "specaug": ("SpecAugment on (2 freq masks <= 15 bins, 2 time masks <= 20 frames)", [
        "--data.spec_augment=true", "--data.freq_mask_width=15", "--data.time_mask_width=20"]),
    "big_batch": ("3x larger batches (12000 frames), a third of the steps", ["--data.max_frames_per_batch=12000"]),
    "shared": ("no head selection (shared attention, the baseline)", ["--selection.enabled=false"]),
}


def run_variant(name: str, overrides: list[str], corpus: str, out: Path, steps: int, extra: list[str]) -> dict:
    """Train + evaluate one variant; returns its row (dev WER per task, average, training wall seconds)."""
    from hs_scale.data import load_tokenizer

    run = out / name
    steps_here = steps // 3 if name == "big_batch" else steps
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    train = [sys.executable, "-m", "hs_scale.cli", "train", "--config", str(CONFIG), f"--data.manifest={corpus}",
             f"--train.output_dir={run}", f"--model.vocab_size={load_tokenizer(corpus).vocab_size}",
             f"--train.steps={steps_here}", f"--train.save_every={max(1, steps_here // 6)}",
             f"--train.eval_every={steps_here}", "--train.progress_bar=false", *overrides, *extra]
    t0 = time.perf_counter()
    with open(out / f"{name}.train.log", "w") as log:
        child = subprocess.run(train, stdout=log, stderr=subprocess.STDOUT, env=env)
    if child.returncode != 0:
        raise RuntimeError(f"{name}: training failed, see {out / f'{name}.train.log'}")
    evaluate = [sys.executable, "-m", "hs_scale.cli", "evaluate", "--checkpoint-root", str(run / "checkpoints"),
                "--average-last", "3", "--split", "dev", "--beam", "1", "--metric", "wer",
                "--out", str(run / "eval_dev.json")]
    with open(out / f"{name}.eval.log", "w") as log:
        subprocess.run(evaluate, stdout=log, stderr=subprocess.STDOUT, env=env, check=True)
    result = json.loads((run / "eval_dev.json").read_text())
    final = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()][-1]
    return {"variant": name, "change": VARIANTS[name][0], "overrides": overrides, "steps": steps_here,
            "dev_wer": result["scores"], "dev_wer_average": result["average"],
            "dev_token_accuracy": final.get("token_accuracy"), "train_wall_s": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", help="a demo corpus (hs-scale prepare-data --recipe demo); --smoke builds a tiny one")
    p.add_argument("--steps", type=int, default=1000, help="training steps per variant (big_batch: a third)")
    p.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="run only these (repeatable)")
    p.add_argument("--out", help="run folder (default: a temporary one)")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--jobs", type=int, default=2, help="variants trained at once (one core each)")
    p.add_argument("--smoke", action="store_true", help="tiny corpus, tiny model, 4 steps: checks the harness")
    args, extra = p.parse_known_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="hs_ablation_"))
    out.mkdir(parents=True, exist_ok=True)
    corpus, steps = args.corpus, args.steps
    if args.smoke:
        from data_pipelines.cli import main as prepare_data

        corpus, steps = str(out / "corpus"), 6
        if prepare_data(["--recipe", "demo", "--out", corpus, "--size", "60", "--dev-size", "6", "--test-size", "6",
                         "--workers", "1"]) != 0:
            raise SystemExit("building the smoke corpus failed")
        extra += ["--model.encoder_layers=1", "--model.decoder_layers=1", "--model.d_model=32", "--model.ffn_dim=64",
                  "--model.conv_channels=32", "--train.warmup_steps=2"]
    if not corpus:
        p.error("--corpus is required (or --smoke)")
    names = args.variant or list(VARIANTS)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(lambda n: run_variant(n, VARIANTS[n][1], corpus, out, steps, extra), names))
    tasks = sorted(rows[0]["dev_wer"])
    print(f"| variant | change | steps | {' | '.join(f'dev WER {t}' for t in tasks)} | dev WER avg |")
    print("|---|---|---|" + "---|" * (len(tasks) + 1))
    for r in rows:
        per = " | ".join(f"{r['dev_wer'][t]:.1f}" for t in tasks)
        print(f"| {r['variant']} | {r['change']} | {r['steps']} | {per} | {r['dev_wer_average']:.1f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "steps": steps, "rows": rows},
                                              indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
