"""Run cells `workers` at a time, each in its own process (`python -m benchmarks.paper.cell`), and collect them.

A separate process per cell keeps cells independent (torch's global state, thread pools, memory) and lets two run
on two cores. Cells live in <out>/cells/<corpus folder>/<cell key> (the key hashes the run config file, the
overrides and the evaluation settings). A cell whose cell.json exists is not run again: an interrupted benchmark
resumes where it stopped, and experiments with identical cells (asr and hsweep at H' = 2H) share them. Nothing
hashes the code: after changing hs_scale itself, use a fresh --out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.paper.plan import Cell

REPO = Path(__file__).resolve().parents[2]


class CellFailed(RuntimeError):
    """A cell's process exited non-zero; the message names its log."""


def _run_one(cell: Cell, manifest: Path, cell_dir: Path, keep_checkpoints: bool) -> dict:
    done = cell_dir / "cell.json"
    if done.is_file():
        return json.loads(done.read_text())
    cell_dir.mkdir(parents=True, exist_ok=True)
    spec = cell_dir / "spec.json"
    spec.write_text(json.dumps({"cell": cell.to_dict(), "manifest": str(manifest),
                                "keep_checkpoints": keep_checkpoints}, indent=1))
    # NOTE: one intra-op thread per cell: `workers` cells then use `workers` cores, and small matrices run faster
    # on one thread than on two busy ones.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
    with open(cell_dir / "log.txt", "w") as log:
        code = subprocess.run([sys.executable, "-m", "benchmarks.paper.cell", str(spec)], cwd=REPO, env=env,
                              stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0 or not done.is_file():
        tail = (cell_dir / "log.txt").read_text().strip().splitlines()[-5:]
        raise CellFailed(f"{cell.experiment}/{cell.variant} H'={cell.pool_heads} seed {cell.seed} failed (exit "
                         f"{code}); log: {cell_dir / 'log.txt'}\n    " + "\n    ".join(tail))
    return json.loads(done.read_text())


def run_cells(cells: list[Cell], manifests: dict[str, Path], cells_dir: Path, workers: int,
              keep_checkpoints: bool = False, log=print) -> tuple[list[dict], list[str]]:
    """(results of the cells that finished, error messages of those that failed), in the order of `cells`.

    Cells with the same key (same settings, e.g. asr and hsweep at H' = 2H) run once; each result carries the
    experiment of the cell it answers.
    """
    unique: dict[str, Cell] = {}
    for c in cells:
        unique.setdefault(c.key, c)
    start = time.perf_counter()
    results: dict[str, dict] = {}
    errors: list[str] = []

    def job(cell: Cell):
        t0 = time.perf_counter()
        try:
            # The corpus folder's name carries the hash of its build settings: a rebuilt corpus gets new cells.
            corpus = manifests[cell.corpus]
            res = _run_one(cell, corpus, cells_dir / corpus.name / cell.key, keep_checkpoints)
        except CellFailed as err:
            errors.append(str(err))
            log(f"[paper] FAILED {err}")
            return
        results[cell.key] = res
        log(f"[paper] {len(results)}/{len(unique)} {cell.experiment} {cell.variant} H'={cell.pool_heads} "
            f"seed {cell.seed}: {res['metric'].upper()} {res['average']:.2f} (wall: train {res['train_s']:.0f} s, "
            f"eval {res['eval_s']:.0f} s, cell {time.perf_counter() - t0:.0f} s; CPU: "
            f"{res.get('process_cpu_s', float('nan')):.0f} s; {time.perf_counter() - start:.0f} s since start)")

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(job, unique.values()))
    return [{**results[c.key], "experiment": c.experiment} for c in cells if c.key in results], errors
