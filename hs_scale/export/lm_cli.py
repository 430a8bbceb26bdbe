"""``hs-scale import-hf`` / ``export-hf`` for decoder-only LMs (hs_scale.export.cli hands LM folders over here).

    hs-scale import-hf --model llama_dir --pool-size 8 --tasks de,fr,sw --out upcycled/ [--scores lahis.safetensors]
    hs-scale export-hf --checkpoint upcycled_or_trained/ --task sw --out sw_llama/

import-hf writes config.yaml (model: LMConfig, selection, data.tasks), model.safetensors (our names, selector
included), the source's tokenizer files and a COMPLETE marker (size + sha256 per file), like the encoder-decoder
import. --scores: per-task head importance (e.g. LAHIS) as safetensors: one [tasks, layers, heads] tensor, or one
[layers, heads] tensor per task name; it sets the initial selection (hs_scale.models.lm.hf.selector_logits).
export-hf reads an import-hf folder or a training checkpoint and writes the task's LlamaForCausalLM folder
(--all-tasks: one such folder per task, OUT/<task>/; a single remote-code model with every task is not
implemented for LMs).
Both write into a temporary sibling of --out and rename it into place (hs_scale.export.cli.staged_output).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

import torch
import yaml

from hs_scale.models.lm.config import LMConfig
from hs_scale.models.lm.hf import TOKENIZER_FILES, export_task, import_hf
from hs_scale.models.lm.model import LMModel
from hs_scale.selection.config import SelectionConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_lm_folder(path: str | Path) -> bool:
    """A HF folder of an importable decoder LM, or an hs_scale folder / checkpoint (step folder or root) whose
    model is arch "lm"."""
    import json

    path = Path(path)
    steps = sorted(path.glob("step_*/config.json"))
    if steps and not (path / "config.json").is_file():  # a checkpoint root: every step has the run's config
        path = steps[-1].parent
    if (path / "config.yaml").is_file():
        return (yaml.safe_load((path / "config.yaml").read_text()) or {}).get("model", {}).get("arch") == "lm"
    if (path / "config.json").is_file():
        raw = json.loads((path / "config.json").read_text())
        from hs_scale.models.lm.hf import IMPORTABLE

        return raw.get("model_type") in IMPORTABLE or (raw.get("model") or {}).get("arch") == "lm"
    return False


def lm_target(argv: list[str] | None, flag: str) -> bool:
    """Whether the folder given to ``flag`` (--model / --checkpoint) in a command line is an LM (is_lm_folder):
    how hs_scale.export.cli decides to hand a command over to this module."""
    args = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            return is_lm_folder(arg.split("=", 1)[1])
        if arg == flag and i + 1 < len(args):
            return is_lm_folder(args[i + 1])
    return False


def load_scores(path: str, tasks: list[str]) -> torch.Tensor:
    """[tasks, layers, heads] from a safetensors file (module docstring for the two accepted layouts)."""
    from safetensors.torch import load_file

    tensors = load_file(path)
    if all(t in tensors for t in tasks):
        return torch.stack([tensors[t].float() for t in tasks])
    if len(tensors) == 1:
        return next(iter(tensors.values())).float()
    raise ValueError(f"--scores {path}: expected one [tasks, layers, heads] tensor or one tensor per task "
                     f"{tasks}; found {sorted(tensors)}")


def import_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hs-scale import-hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="dense Llama / Mistral / Qwen2 save_pretrained directory")
    p.add_argument("--pool-size", type=int, required=True, help="P = r * num_attention_heads candidates per layer")
    p.add_argument("--tasks", required=True, help="comma-separated task names, in task-id order")
    p.add_argument("--out", required=True, help="output directory: config.yaml + model.safetensors")
    p.add_argument("--strategy", default="group", choices=["group", "subset"])
    p.add_argument("--scores", help="per-task head importance (safetensors) for the initial selection")
    p.add_argument("--seed", type=int, default=0, help="selection noise seed (and random warm start without scores)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="weight dtype of the pool (selector logits stay float32)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (atomically)")
    return p


def main_import(argv: list[str] | None = None) -> int:
    from safetensors.torch import save_file

    from hs_scale.export.cli import staged_output, write_marker
    from hs_scale.export.materialize import ExportError

    args = import_parser().parse_args(argv)
    try:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"--tasks {args.tasks!r}: give each task name once, in task-id order")
        selection = SelectionConfig(strategy=args.strategy, pool_heads=args.pool_size, seed=args.seed)
        scores = load_scores(args.scores, tasks) if args.scores else None
        model = import_hf(args.model, selection, len(tasks), scores, dtype=DTYPES[args.dtype])
        sections = {"model": dataclasses.asdict(model.config), "selection": dataclasses.asdict(selection),
                    "data": {"tasks": tasks, "task_key": selection.task_key, "modality": "text"}}
        with staged_output(args.out, args.overwrite) as out:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(out) / "model.safetensors"))
            (Path(out) / "config.yaml").write_text(yaml.safe_dump(sections, sort_keys=False))
            for name in TOKENIZER_FILES:
                if (Path(args.model) / name).is_file():
                    shutil.copy(Path(args.model) / name, Path(out) / name)
            write_marker(out)
    except (ExportError, ValueError, OSError) as err:
        print(f"hs-scale import-hf: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({len(tasks)} tasks, pool {args.pool_size}, r = {model.candidates})")
    return 0


def load_lm(path: str | Path, verify: bool = True) -> tuple[LMModel, list[str], dict]:
    """(model in eval mode, task names, config dict) of an import-hf folder or a training checkpoint."""
    from safetensors.torch import load_file

    path = Path(path)
    if (path / "config.yaml").is_file() and (path / "model.safetensors").is_file():  # import-hf output
        config = yaml.safe_load((path / "config.yaml").read_text())
        state = load_file(path / "model.safetensors")
    else:
        from hs_scale.checkpoint import load_full_model_state

        config, state = load_full_model_state(path, verify=verify)
    from hs_scale.export.cli import task_names_of

    tasks = task_names_of(config, None)
    model = LMModel(LMConfig(**config["model"]), SelectionConfig(**config.get("selection", {})), len(tasks))
    vocab = model.config.vocab_size
    for name in ("embed_tokens.weight", "lm_head.weight"):  # a TP run pads the vocabulary (padded_vocab_size)
        if name in state and state[name].shape[0] > vocab:
            state[name] = state[name][:vocab]
    model.load_state_dict(state, strict=True)
    return model.eval(), tasks, config


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hs-scale export-hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="import-hf output or training checkpoint of an LM")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", help="task (language) to export")
    which.add_argument("--all-tasks", action="store_true",
                       help="every task, each as its own LlamaForCausalLM in OUT/<task>/")
    p.add_argument("--out", required=True, help="output directory (save_pretrained layout)")
    p.add_argument("--tokenizer", help="folder whose tokenizer files are copied (default: --checkpoint)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="weight dtype (default: the checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (atomically)")
    p.add_argument("--no-verify", action="store_true", help="skip the checkpoint checksum verification")
    return p


def main_export(argv: list[str] | None = None) -> int:
    from hs_scale.export.cli import _user_errors, staged_output

    args = export_parser().parse_args(argv)
    try:
        model, tasks, _ = load_lm(args.checkpoint, verify=not args.no_verify)
        if args.task is not None and args.task not in tasks:
            raise ValueError(f"unknown task {args.task!r}; this model's tasks are {tasks}")
        tokenizer, dtype = args.tokenizer or args.checkpoint, DTYPES.get(args.dtype)
        with staged_output(args.out, args.overwrite) as out:
            if args.all_tasks:
                for i, name in enumerate(tasks):
                    export_task(model, i, Path(out) / name, tokenizer_from=tokenizer, dtype=dtype)
            else:
                export_task(model, tasks.index(args.task), out, tokenizer_from=tokenizer, dtype=dtype)
    except _user_errors() as err:
        print(f"hs-scale export-hf: {err}", file=sys.stderr)
        return 2
    which = f"task {args.task}" if args.task else f"tasks {', '.join(tasks)}, one folder each"
    print(f"wrote {args.out} ({which}: LlamaForCausalLM)")
    return 0
