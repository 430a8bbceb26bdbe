"""hs-scale export-hf writes a checkpoint as a transformers model directory; hs-scale import-hf turns a dense
transformers model into a head-selection model to train from (docs/export.md).

    hs-scale export-hf --checkpoint CKPT --task de --out out/de [--tokenizer data/asr8]
    hs-scale export-hf --checkpoint CKPT --all-tasks --out out/all
    hs-scale import-hf --model dense_dir --pool-size 8 --tasks de,fr,es --out upcycled/

Both write into a temporary sibling of --out and rename it into place at the end, so --out never holds a mix of
an old and a new model: a non-empty --out is refused unless --overwrite (which then replaces it whole).
export-hf verifies the checkpoint first (COMPLETE marker + sha256, like training's resume); --no-verify skips it.
A speech run with global CMVN (data.cmvn: global) is exported with the corpus's stats folded into the first
convolution, so the processor takes raw audio and generate() reproduces `hs-scale evaluate`.
import-hf's output (config.yaml, model.safetensors, COMPLETE) is a start for `hs-scale train --config
OUT/config.yaml --data.manifest CORPUS --train.init_from OUT`; a speech model's data.cmvn follows its feature
extractor (utterance CMVN on: utterance; off, as in our global-CMVN exports whose stats are in the weights: none).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from hs_scale.export.materialize import ExportError


@contextmanager
def staged_output(out: str, overwrite: bool):
    """Yield a fresh temporary directory next to `out`; on success it replaces `out` (module docstring)."""
    target = Path(out)
    if target.exists() and not target.is_dir():
        raise ExportError(f"--out {out} is a file; give a directory path")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ExportError(f"--out {out} is not empty: pass --overwrite to replace it, or choose a new directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    nonce = secrets.token_hex(4)
    tmp = target.with_name(f".{target.name}.tmp-{nonce}")
    tmp.mkdir()
    try:
        yield str(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old-{nonce}")
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(path: str, verify: bool = True) -> tuple[dict, dict]:
    try:
        from hs_scale.checkpoint import load_full_model_state
    except ImportError as err:  # the checkpoint package is another component; say what is missing
        raise ExportError(f"cannot read checkpoints: hs_scale.checkpoint unavailable ({err})") from err
    config_dict, state = load_full_model_state(path, verify=verify)
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
        config_dict, state = load_full_model_state(path, like=like, verify=False)  # verified just above
    return config_dict, state


def _user_errors() -> tuple[type[BaseException], ...]:
    """What export-hf reports as one line (a corrupt checkpoint included); anything else is a bug: traceback."""
    from hs_scale.checkpoint import CheckpointError

    return ExportError, ValueError, KeyError, FileNotFoundError, CheckpointError


def task_names_of(config_dict: dict, override: str | None) -> list[str]:
    """The run's task names in id order: --task-names, the checkpoint's own list, synthetic rules, data.tasks or
    the corpus manifest (what the loader inferred)."""
    if override:
        names = [t.strip() for t in override.split(",") if t.strip()]
        repeated = sorted({t for t in names if names.count(t) > 1})
        if repeated:
            raise ExportError(f"--task-names lists {repeated} more than once: give each task once, in task-id order")
        return names
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


def _cmvn_stats_path(config_dict: dict, checkpoint: str) -> str | None:
    """The run's corpus's cmvn.json (relative corpus paths read from the training folder, as evaluate does)."""
    from hs_scale.data import urls
    from hs_scale.data.config import DataConfig
    from hs_scale.evaluation.cli import rebase_data_paths

    data = rebase_data_paths(config_dict, Path(checkpoint)).get("data") or {}
    return urls.join(DataConfig(**data).corpus_dir, "cmvn.json") if data.get("manifest") else None


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
    p.add_argument("--cmvn-stats", help="cmvn.json to fold in (data.cmvn global; default: the run's corpus's)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (atomically)")
    p.add_argument("--no-verify", action="store_true",
                   help="load the checkpoint even if it fails its checksum (at your own risk)")
    return p


def main_export(argv: list[str] | None = None) -> int:
    from hs_scale.export import lm_cli

    if lm_cli.lm_target(argv, "--checkpoint"):  # decoder-only LMs: their own exporter (docs/lm.md)
        return lm_cli.main_export(argv)
    args = export_parser().parse_args(argv)
    try:
        from hs_scale.data.tokenizer import load_tokenizer
        from hs_scale.evaluation.search import SearchConfig
        from hs_scale.export.all_tasks import export_all_tasks
        from hs_scale.export.per_task import export_task, resolve_decoder_start

        if not os.path.exists(args.checkpoint):
            raise FileNotFoundError(f"--checkpoint {args.checkpoint} does not exist")
        config_dict, state = _load_checkpoint(args.checkpoint, verify=not args.no_verify)
        task_names = task_names_of(config_dict, args.task_names)
        tok_path = _tokenizer_path(config_dict, args.tokenizer)
        tokenizer = load_tokenizer(tok_path) if tok_path else None
        data = config_dict.get("data") or {}
        partitions = args.partitions or int((config_dict.get("parallel") or {}).get("tensor_parallel", 1))
        common = dict(partitions=partitions, search=SearchConfig(beam=args.beam), cmvn=data.get("cmvn", "global"),
                      cmvn_stats=args.cmvn_stats or _cmvn_stats_path(config_dict, args.checkpoint))
        model_cfg, sel_cfg = config_dict["model"], config_dict.get("selection")

        def start_of(dec_task: str) -> int:
            if args.decoder_start_token_id is not None:
                return args.decoder_start_token_id
            return resolve_decoder_start(config_dict, task_names, dec_task, tokenizer)

        if args.all_tasks:
            starts = {name: start_of(name) for name in task_names}
            with staged_output(args.out, args.overwrite) as out:
                summary = export_all_tasks(model_cfg, sel_cfg, state, task_names, out, tok_path,
                                           task_decoder_start=starts, **common)
        else:
            dec_task = args.task.split("->", 1)[-1].strip()
            if dec_task not in task_names:
                raise ExportError(f"unknown task {dec_task!r}; this checkpoint's tasks are {task_names}")
            start = start_of(dec_task)
            with staged_output(args.out, args.overwrite) as out:
                summary = export_task(model_cfg, sel_cfg, state, task_names, args.task, out, tok_path,
                                      decoder_start_token_id=start, **common)
    except _user_errors() as err:
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
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (atomically)")
    return p


def main_import(argv: list[str] | None = None) -> int:
    from hs_scale.export import lm_cli

    if lm_cli.lm_target(argv, "--model"):  # Llama / Mistral / Qwen2 folders: the LM importer (docs/lm.md)
        return lm_cli.main_import(argv)
    args = import_parser().parse_args(argv)
    try:
        import yaml
        from safetensors.torch import save_file

        from hs_scale.export.upcycle import import_dense
        from hs_scale.selection.config import SelectionConfig
        from hs_scale.selection.sites import SITE_NAMES

        off = {t.strip() for t in args.no_select.split(",") if t.strip()}
        unknown = off - set(SITE_NAMES)
        if unknown:
            raise ExportError(f"--no-select {sorted(unknown)}: use encoder_self, decoder_self or cross")
        selection = SelectionConfig(strategy=args.strategy, pool_heads=args.pool_size,
                                    **{t: False for t in off})
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        repeated = sorted({t for t in tasks if tasks.count(t) > 1})
        if repeated:
            raise ExportError(f"--tasks lists {repeated} more than once: give each task once, in task-id order")
        if not tasks:
            raise ExportError("--tasks is empty: give the task names in task-id order, e.g. --tasks de,fr,es")
        model_cfg, selection, model = import_dense(args.model, args.pool_size, tasks, selection,
                                                   args.perturb_std, args.seed)
        sections = import_config(model_cfg, selection, tasks, hf_cmvn(args.model))
        with staged_output(args.out, args.overwrite) as out:
            state = {k: v.contiguous() for k, v in model.state_dict().items()}
            save_file(state, os.path.join(out, "model.safetensors"))
            with open(os.path.join(out, "config.yaml"), "w") as fh:
                yaml.safe_dump(sections, fh, sort_keys=False)
            write_marker(out)
    except (ExportError, ValueError, OSError) as err:
        print(f"hs-scale import-hf: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}/model.safetensors and config.yaml ({len(tasks)} tasks, pool {args.pool_size})")
    return 0


def hf_cmvn(model_dir: str) -> str:
    """The data.cmvn a speech HF model expects: its feature extractor's per-utterance CMVN ("utterance", also
    transformers' default when there is no preprocessor_config.json) or none ("none": raw features, e.g. our
    global-CMVN exports, whose stats are folded into the weights; training them with "global" would normalise
    twice)."""
    path = Path(model_dir) / "preprocessor_config.json"
    if not path.exists():
        return "utterance"
    return "utterance" if json.loads(path.read_text()).get("do_ceptral_normalize", True) else "none"


def import_config(model_cfg, selection, tasks: list[str], cmvn: str = "utterance") -> dict:
    """config.yaml of an import-hf output: a run config `show-config` accepts (the corpus to train on is added
    with --data.manifest); the task names go to data.tasks, which fixes the task ids; speech: data.cmvn (hf_cmvn)."""
    import dataclasses

    from hs_scale.config import config_from_dict

    speech = model_cfg.arch == "s2t"
    sections = {
        "model": dataclasses.asdict(model_cfg),
        "selection": dataclasses.asdict(selection),
        "data": {"tasks": list(tasks), "task_key": selection.task_key, "modality": "speech" if speech else "text",
                 **({"cmvn": cmvn} if speech else {})},
    }
    config_from_dict(sections)  # what we write must load: refuse here rather than at train time
    return sections


def write_marker(folder: str) -> None:
    """COMPLETE (size + sha256 of every file), as in a checkpoint: init_from verifies it the same way."""
    from hs_scale.checkpoint import safe_io

    files = {f.name: {"size": f.stat().st_size, "sha256": safe_io.sha256_file(f)}
             for f in sorted(Path(folder).iterdir()) if f.is_file()}
    safe_io.write_json(Path(folder) / "COMPLETE", {"step": 0, "files": files})
