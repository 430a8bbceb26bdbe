"""One benchmark cell: `hs_scale.training.run.train(cfg)` in this process, then decode the eval split and score it.

    python -m benchmarks.paper.cell <cell_dir>/spec.json      # what the runner starts, one process per cell

spec.json: {"cell": Cell.to_dict(), "manifest": corpus folder}. Writes <cell_dir>/cell.json:
    {..cell fields.., "metric", "scores": {label: %}, "average", "num_sentences": {label: n}, "signature",
     "task_names", "encoder_tasks", "decoder_tasks", "selection": {type: table[task][layer] = heads} | {},
     "train_s", "eval_s" (wall), "train_cpu_s", "eval_cpu_s", "process_cpu_s" (CPU time),
     "dev": {final teacher-forced dev metrics}}
A label is the task for ASR (source task = target task) and "<src task>-><tgt task>" for translation, so ST and MT
are scored per direction (hs_scale.evaluation.evaluate groups by one side only). The checkpoints are deleted
after scoring unless spec["keep_checkpoints"] (a cell's model and optimizer state are 50-100 MB on the cpu preset).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

from benchmarks.paper.plan import Cell, check_cell_config


def _label(src: str, tgt: str) -> str:
    return tgt if src == tgt else f"{src}->{tgt}"


def score_by_direction(model, batches, decode, task_names: list[str], metric: str, search) -> dict:
    """Decode every batch with `search` (SearchConfig) and score per (source task, target task) label."""
    from hs_scale.evaluation.evaluate import reference_ids
    from hs_scale.evaluation.metrics import score_per_task
    from hs_scale.evaluation.search import generate

    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    device = next(model.parameters()).device
    hyps: dict[str, list[str]] = {}
    refs: dict[str, list[str]] = {}
    for batch in batches:
        if getattr(batch, "is_padding", False):
            continue
        batch = batch.to(device)
        out = generate(model, batch, search)
        pairs = zip(batch.src_task.tolist(), batch.tgt_task.tolist(), strict=True)
        for (s, t), hyp, ref in zip(pairs, out.tokens, reference_ids(batch.target, eos, pad), strict=True):
            label = _label(task_names[s], task_names[t])
            hyps.setdefault(label, []).append(decode(hyp))
            refs.setdefault(label, []).append(decode(ref))
    order = sorted(hyps)
    return score_per_task(metric, {k: hyps[k] for k in order}, {k: refs[k] for k in order})


def side_tasks(data_cfg, split: str = "train") -> tuple[list[str], list[str]]:
    """(encoder tasks, decoder tasks) that occur in `split`: the selector rows each side actually trains."""
    from hs_scale.data.manifest import read_manifest, row_tasks

    m = read_manifest(data_cfg.manifest_path, ["split", "lang", "tgt_lang", "domain"])
    enc, dec = set(), set()
    for s, lang, tgt, dom in zip(m["split"], m["lang"], m["tgt_lang"], m["domain"], strict=True):
        if s == split:
            e, d, _, _ = row_tasks(data_cfg, lang, tgt, dom or None)
            enc.add(e)
            dec.add(d)
    return sorted(enc), sorted(dec)


def run_cell(cell: Cell, manifest: str, cell_dir: Path, keep_checkpoints: bool = False) -> dict:
    import torch

    from hs_scale.data.tokenizer import load_tokenizer
    from hs_scale.evaluation.cli import eval_inputs, load_model, resolve_checkpoints
    from hs_scale.evaluation.search import SearchConfig
    from hs_scale.training.run import train

    tokenizer = load_tokenizer(manifest)
    cfg = check_cell_config(cell, manifest, tokenizer.vocab_size, str(cell_dir / "train"))
    start, cpu0 = time.perf_counter(), time.process_time()
    dev = train(cfg)
    train_s, train_cpu_s = time.perf_counter() - start, time.process_time() - cpu0

    start, cpu0 = time.perf_counter(), time.process_time()
    ev = cell.eval
    paths = resolve_checkpoints(None, str(cell_dir / "train" / "checkpoints"), ev["average_last"])
    cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    device = "cuda" if cuda else "cpu"  # decode where the cell trained
    cfg, model, task_names = load_model(paths, device=device)
    batches, decode, metric = eval_inputs(cfg, ev["split"], ev["metric"])
    search = SearchConfig(beam=ev["beam"], max_len_a=ev["max_len_a"], max_len_b=ev["max_len_b"])
    with torch.no_grad():
        scored = score_by_direction(model, batches, decode, task_names, metric, search)
    enc, dec = side_tasks(cfg.data)
    result = {
        **cell.to_dict(), **scored, "task_names": task_names, "encoder_tasks": enc, "decoder_tasks": dec,
        "selection": model.head_selection_table() if cfg.selection.enabled else {},
        "train_s": round(train_s, 1), "eval_s": round(time.perf_counter() - start, 1),
        # CPU seconds of this process: on a shared machine the wall times above include waiting for a core;
        # with one thread per cell, CPU time is what the cell costs on an idle core.
        "train_cpu_s": round(train_cpu_s, 1), "eval_cpu_s": round(time.process_time() - cpu0, 1),
        "process_cpu_s": round(time.process_time(), 1),
        "dev": {k: v for k, v in dev.items() if isinstance(v, (int, float)) and math.isfinite(v)},
        "checkpoints": [p.name for p in paths],
    }
    if not keep_checkpoints:
        shutil.rmtree(cell_dir / "train" / "checkpoints", ignore_errors=True)
    (cell_dir / "cell.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.paper.cell <cell_dir>/spec.json", file=sys.stderr)
        return 2
    spec_path = Path(argv[0])
    spec = json.loads(spec_path.read_text())
    raw = dict(spec["cell"])
    raw["overrides"] = tuple(raw["overrides"])
    run_cell(Cell(**raw), spec["manifest"], spec_path.parent, spec.get("keep_checkpoints", False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
