"""``hs-scale export-hf`` and ``hs-scale import-hf`` (the lead wires ``main_export`` / ``main_import`` into hs-scale).

    hs-scale export-hf --checkpoint CKPT --task de --out out/de [--tokenizer data/asr8]
    hs-scale export-hf --checkpoint CKPT --all-tasks --out out/all
    hs-scale import-hf --model dense_dir --pool-size 8 --tasks de,fr,es --out upcycled/
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from hs_scale.export.materialize import ExportError


def _load_checkpoint(path: str) -> tuple[dict, dict]:
    try:
        from hs_scale.checkpoint import load_full_model_state
    except ImportError as err:  # the checkpoint package is another component; say what is missing
        raise ExportError(f"cannot read checkpoints: hs_scale.checkpoint unavailable ({err})") from err
    config_dict, state = load_full_model_state(path)
    # Tied aliases the checkpoint stored once are filled by loading again against a model of the run's shapes.
    from hs_scale.models import build_model
    from hs_scale.models.config import ModelConfig
    from hs_scale.selection.config import SelectionConfig

    try:
        like = build_model(ModelConfig(**config_dict["model"]), SelectionConfig(**config_dict.get("selection", {})),
                           len(task_names_of(config_dict, None)))
    except (ExportError, TypeError, ValueError):
        return config_dict, state  # export_task names the problem (unknown option, task names...)
    if set(like.state_dict()) - set(state):
        config_dict, state = load_full_model_state(path, like=like)
    return config_dict, state


def task_names_of(config_dict: dict, override: str | None) -> list[str]:
    """The run's task names in id order: --task-names, the checkpoint's own list, synthetic rules, data.tasks or
    the corpus manifest (what the loader inferred)."""
    if override:
        return [t.strip() for t in override.split(",") if t.strip()]
    if config_dict.get("task_names"):
        return list(config_dict["task_names"])
    if config_dict.get("synthetic"):
        return list(config_dict["synthetic"].get("rules") or ["copy", "reverse", "shift", "swap_pairs"])
    data = config_dict.get("data") or {}
    if data.get("tasks"):
        return list(data["tasks"])
    if data.get("manifest"):
        from hs_scale.data.config import DataConfig
        from hs_scale.data.manifest import infer_tasks

        return infer_tasks(DataConfig(**data))
    raise ExportError("cannot tell the run's task names; pass --task-names a,b,... in task-id order")


def _tokenizer_path(config_dict: dict, given: str | None) -> str | None:
    if given:
        return given
    data = config_dict.get("data") or {}
    if data.get("tokenizer"):
        return data["tokenizer"]
    if data.get("manifest"):
        from hs_scale.data.config import DataConfig

        path = os.path.join(DataConfig(**data).corpus_dir, "tokenizer.model")
        return path if os.path.exists(path) else None
    return None


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hs-scale export-hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (any TP/PP layout)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", help='task to export: "de", or "de->en" (encoder task -> decoder task)')
    which.add_argument("--all-tasks", action="store_true", help="one remote-code directory with every task")
    p.add_argument("--out", required=True, help="output directory (save_pretrained layout)")
    p.add_argument("--tokenizer", help="SentencePiece model or corpus dir (default: the run's data.tokenizer)")
    p.add_argument("--task-names", help="comma-separated task names in id order (default: from the run's config)")
    p.add_argument("--decoder-start-token-id", type=int, help="first decoder token (default: from the run)")
    p.add_argument("--partitions", type=int, help="TP size the run selected with (default: parallel.tensor_parallel)")
    p.add_argument("--beam", type=int, default=5, help="num_beams written to generation_config.json")
    return p


def main_export(argv: list[str] | None = None) -> int:
    args = export_parser().parse_args(argv)
    try:
        from hs_scale.data.tokenizer import load_tokenizer
        from hs_scale.evaluation.search import SearchConfig
        from hs_scale.export.all_tasks import export_all_tasks
        from hs_scale.export.per_task import export_task, resolve_decoder_start

        config_dict, state = _load_checkpoint(args.checkpoint)
        task_names = task_names_of(config_dict, args.task_names)
        tok_path = _tokenizer_path(config_dict, args.tokenizer)
        tokenizer = load_tokenizer(tok_path) if tok_path else None
        data = config_dict.get("data") or {}
        partitions = args.partitions or int((config_dict.get("parallel") or {}).get("tensor_parallel", 1))
        common = dict(partitions=partitions, search=SearchConfig(beam=args.beam), cmvn=data.get("cmvn", "utterance"),
                      cmvn_stats=os.path.join(os.path.dirname(tok_path), "cmvn.json") if tok_path else None)
        model_cfg, sel_cfg = config_dict["model"], config_dict.get("selection")

        def start_of(dec_task: str) -> int:
            if args.decoder_start_token_id is not None:
                return args.decoder_start_token_id
            return resolve_decoder_start(config_dict, task_names, dec_task, tokenizer)

        if args.all_tasks:
            starts = {name: start_of(name) for name in task_names}
            summary = export_all_tasks(model_cfg, sel_cfg, state, task_names, args.out, tok_path,
                                       task_decoder_start=starts, **common)
        else:
            dec_task = args.task.split("->", 1)[-1].strip()
            if dec_task not in task_names:
                raise ExportError(f"unknown task {dec_task!r}; this checkpoint's tasks are {task_names}")
            summary = export_task(model_cfg, sel_cfg, state, task_names, args.task, args.out, tok_path,
                                  decoder_start_token_id=start_of(dec_task), **common)
    except (ExportError, ValueError, KeyError, FileNotFoundError) as err:
        print(f"hs-scale export-hf: {err}", file=sys.stderr)
        return 2
    for note in summary.get("notes", []):
        print(f"note: {note}")
    print(f"wrote {args.out} ({json.dumps({k: summary[k] for k in summary if k not in ('heads', 'notes')})})")
    return 0


def import_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hs-scale import-hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="dense Speech2Text / M2M100 save_pretrained directory")
    p.add_argument("--pool-size", type=int, required=True, help="H', a multiple of the dense model's heads")
    p.add_argument("--tasks", required=True, help="comma-separated task names, in task-id order")
    p.add_argument("--out", required=True, help="output directory: config.yaml + model.safetensors")
    p.add_argument("--strategy", default="group", choices=["group", "subset"])
    p.add_argument("--no-select", default="", help="comma-separated attention types to keep dense "
                   "(encoder_self, decoder_self, cross)")
    p.add_argument("--perturb-std", type=float, default=0.0, help="noise on the non-original copies' Q/K/V rows")
    p.add_argument("--seed", type=int, default=0)
    return p


def main_import(argv: list[str] | None = None) -> int:
    args = import_parser().parse_args(argv)
    try:
        import dataclasses

        import yaml
        from safetensors.torch import save_file

        from hs_scale.export.upcycle import import_dense
        from hs_scale.selection.config import SelectionConfig

        off = {t.strip() for t in args.no_select.split(",") if t.strip()}
        unknown = off - {"encoder_self", "decoder_self", "cross"}
        if unknown:
            raise ExportError(f"--no-select {sorted(unknown)}: use encoder_self, decoder_self or cross")
        selection = SelectionConfig(strategy=args.strategy, pool_heads=args.pool_size,
                                    **{t: False for t in off})
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        model_cfg, selection, model = import_dense(args.model, args.pool_size, tasks, selection,
                                                   args.perturb_std, args.seed)
        os.makedirs(args.out, exist_ok=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(args.out, "model.safetensors"))
        sections = {"model": dataclasses.asdict(model_cfg), "selection": dataclasses.asdict(selection),
                    "task_names": tasks}
        with open(os.path.join(args.out, "config.yaml"), "w") as fh:
            yaml.safe_dump(sections, fh, sort_keys=False)
    except (ExportError, ValueError, OSError) as err:
        print(f"hs-scale import-hf: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}/model.safetensors and config.yaml ({len(tasks)} tasks, pool {args.pool_size})")
    return 0
