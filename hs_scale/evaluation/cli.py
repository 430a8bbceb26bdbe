"""`hs-scale evaluate`: decode a split with one checkpoint or the average of several, score it, write JSON.

    hs-scale evaluate --checkpoint runs/x/checkpoints/step_000010000 --split valid --beam 5 --out eval.json
    hs-scale evaluate --checkpoint-root runs/x/checkpoints --average-last 10 --metric wer --out eval.json
    hs-scale evaluate --checkpoint /abs/runs/x/checkpoints --data.manifest /data/other_corpus   # any --data.FIELD
    hs-scale evaluate --checkpoint runs/x/checkpoints/step_000002000 --split dev --beam 1 --utterances-per-task 50
        # = the WER/BLEU per task training logged at step 2000 (train.eval_decode_*, docs/training.md)

Relative data paths stored in the checkpoint's config (data.manifest, data.tokenizer) are read from the current
folder when they exist there, else from the folder the training ran in (the checkpoint path minus
`<train.output_dir>/checkpoints/step_*`), so a run evaluates from anywhere. `--data.FIELD VALUE` overrides any
data field (another corpus, split layout or tokenizer); other sections are the checkpoint's and cannot change.

Checkpoints are read with ``hs_scale.checkpoint.load_full_model_state`` (imported only when needed, so this module
and everything below it import without the checkpoint stack), which verifies each one (COMPLETE marker + sha256)
and refuses a corrupt one naming it; ``--average-last`` averages only checkpoints that verify (``--no-verify``
skips verification, at your own risk). The paper's recipe: beam 5, the average of the last
10 checkpoints, WER for ASR and BLEU for ST/MT.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from hs_scale.evaluation.evaluate import average_checkpoints, evaluate, first_utterances, write_results
from hs_scale.evaluation.metrics import METRICS

LoadFn = Callable[..., tuple[dict, dict]]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hs-scale evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint",
        action="append",
        metavar="DIR",
        help="checkpoint folder (step_*) or a root (its latest); repeat to average several",
    )
    src.add_argument("--checkpoint-root", metavar="DIR", help="folder of step_* checkpoints (with --average-last)")
    p.add_argument(
        "--average-last",
        type=int,
        default=1,
        metavar="N",
        help="with --checkpoint-root: average the last N complete checkpoints (paper: 10)",
    )
    p.add_argument("--split", default="valid", help="split to decode (corpus split name, or synthetic 'valid')")
    p.add_argument(
        "--metric",
        default="auto",
        choices=("auto",) + METRICS,
        help="auto: accuracy for the synthetic task, wer for transcripts, bleu for translations",
    )
    p.add_argument("--beam", type=int, default=5, help="beam size; 1 = greedy")
    p.add_argument("--utterances-per-task", type=int, default=0, metavar="N",
                   help="decode only the first batches of the split holding N utterances of each task (0: all); "
                        "with --split dev and --beam / --max-len-b set to train.eval_decode_beam / eval_decode_max_len "
                        "it gives the WER/BLEU training logged with train.eval_decode_utterances=N")
    p.add_argument("--max-len-a", type=float, default=0.0, help="max output tokens = a * source length + b")
    p.add_argument("--max-len-b", type=int, default=200, help="see --max-len-a")
    p.add_argument("--lenpen", type=float, default=1.0, help="length penalty exponent")
    p.add_argument("--group-by", default="tgt_task", choices=("tgt_task", "src_task"), help="per-task key")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", metavar="JSON", help="write the results here")
    p.add_argument("--keep-outputs", action="store_true",
                   help="include every utterance's key, hypothesis and reference in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-verify", action="store_true",
                   help="load checkpoints even if they fail their checksum (at your own risk)")
    return p


def data_overrides(extra: list[str]) -> dict:
    """`--data.FIELD VALUE` arguments -> {"data": {...}}; anything else is refused with the reason."""
    from hs_scale.config import ConfigError, parse_overrides

    try:
        tree = parse_overrides(extra)
    except ConfigError as err:
        raise ValueError(str(err)) from None
    for section, value in tree.items():
        if not isinstance(value, dict):
            raise ValueError(f"unrecognized argument --{section} (see hs-scale evaluate --help)")
        if section != "data":
            raise ValueError(f"--{section}.*: evaluate takes the model, selection and training config from the "
                             "checkpoint; only --data.FIELD overrides are accepted")
    return tree


def training_folder(checkpoint: Path, output_dir: str) -> Path | None:
    """The folder training ran in, if `checkpoint` (absolute or not) ends in <output_dir>/checkpoints[/step_*]."""
    out = Path(output_dir)
    if out.is_absolute():
        return None
    path = checkpoint.resolve()
    if path.name.startswith("step_"):
        path = path.parent
    if path.name != "checkpoints":
        return None
    run_dir = path.parent
    parts = out.parts
    if tuple(run_dir.parts[-len(parts):]) != parts:
        return None
    return Path(*run_dir.parts[: -len(parts)]) if len(run_dir.parts) > len(parts) else Path("/")


def rebase_data_paths(config_dict: dict, checkpoint: Path) -> dict:
    """config_dict with relative data.manifest / data.tokenizer that do not exist here read from the training folder."""
    from hs_scale.data import urls

    if not config_dict.get("data"):
        return config_dict
    data = dict(config_dict["data"])
    base = training_folder(checkpoint, (config_dict.get("train") or {}).get("output_dir", ""))
    if base is None:
        return config_dict
    for field in ("manifest", "tokenizer"):
        value = data.get(field) or ""
        local = urls.local_path(value) if value else None
        if local is None or Path(local).is_absolute() or Path(local).exists():
            continue
        if (base / local).exists():
            data[field] = str(base / local)
    return {**config_dict, "data": data}


def resolve_checkpoints(checkpoints: list[str] | None, root: str | None, last_n: int,
                        verify: bool = True) -> list[Path]:
    """The folders to load: the explicit ones, or the last ``last_n`` verified step folders under ``root``."""
    if checkpoints:
        return [Path(c) for c in checkpoints]
    if last_n < 1:
        raise ValueError(f"--average-last {last_n} must be >= 1")
    from hs_scale.checkpoint import CheckpointManager

    manager = CheckpointManager(root)
    complete = []
    for info in reversed(manager.list_checkpoints()):  # newest first: verify only as many as needed
        if len(complete) == last_n:
            break
        reason = manager.verify(info.path) if verify else (None if info.complete else "no COMPLETE marker")
        if reason is None:
            complete.insert(0, info.path)
        else:
            print(f"hs-scale evaluate: skipping {info.path}: {reason}", file=sys.stderr)
    if not complete:
        raise FileNotFoundError(f"no complete, verified checkpoint under {root}")
    if len(complete) < last_n:
        print(
            f"hs-scale evaluate: only {len(complete)} complete checkpoints under {root}; averaging them all",
            file=sys.stderr,
        )
    return [Path(p) for p in complete[-last_n:]]


def load_model(paths: list[Path], load_fn: LoadFn | None = None, device: str | torch.device = "cpu",
               verify: bool = True, overrides: dict | None = None):
    """(Config, model in eval mode, task names) from the average of the checkpoints at ``paths``.

    ``load_fn(path, like=model)`` -> (config dict, state dict); default ``load_full_model_state``. The first
    checkpoint is read once more to learn the config the model is built from. ``overrides`` ({"data": {...}})
    replace data fields; relative data paths are rebased (`rebase_data_paths`).
    """
    from hs_scale.config import config_from_dict
    from hs_scale.data.features import use_global_cmvn
    from hs_scale.models import build_model

    if load_fn is None:
        from functools import partial

        from hs_scale.checkpoint import load_full_model_state

        load_fn = partial(load_full_model_state, verify=verify)
    config_dict, _ = load_fn(paths[0])
    config_dict = rebase_data_paths(config_dict, paths[0])
    if (overrides or {}).get("data"):
        config_dict = {**config_dict, "data": {**(config_dict.get("data") or {}), **overrides["data"]}}
    cfg = config_from_dict(config_dict)
    task_names = task_names_of(cfg)
    model = build_model(cfg.model, cfg.selection, num_tasks=len(task_names))
    use_global_cmvn(model, cfg.data)  # data.cmvn=global is applied inside the model (hs_scale.data.features)
    states = []
    for path in paths:
        other, state = load_fn(path, like=model)
        if other.get("model") != config_dict.get("model") or other.get("selection") != config_dict.get("selection"):
            raise ValueError(f"{path} has another model/selection config than {paths[0]}; cannot average them")
        states.append(state)
    model.load_state_dict(average_checkpoints(states), strict=True)
    return cfg, model.to(device).eval(), task_names


def task_names_of(cfg) -> list[str]:
    """Task vocabulary in id order: the synthetic rules, or the corpus's tasks (explicit or from the manifest)."""
    if cfg.synthetic is not None:
        return cfg.synthetic.task_names
    if cfg.data.tasks:
        return list(cfg.data.tasks)
    from hs_scale.data.manifest import infer_tasks

    return list(infer_tasks(cfg.data))


def eval_inputs(cfg, split: str, metric: str) -> tuple[list | object, Callable[[list[int]], str], str]:
    """(batches, tokenizer_decode, metric) for ``split``; ``metric`` "auto" is resolved here."""
    if cfg.synthetic is not None:
        from hs_scale.data.synthetic import SyntheticTask

        task = SyntheticTask(cfg.synthetic)
        if split not in task._SPLIT_SALT:
            raise ValueError(f"--split {split!r}: the synthetic task has the splits {sorted(task._SPLIT_SALT)}")
        n = cfg.synthetic.eval_batches * len(cfg.synthetic.rules)
        batches = [task.batch(i, split) for i in range(n)]
        return batches, lambda ids: " ".join(map(str, ids)), auto_metric(cfg) if metric == "auto" else metric
    from hs_scale.data.loader import build_loader
    from hs_scale.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.data.tokenizer or cfg.data.corpus_dir)
    metric = auto_metric(cfg) if metric == "auto" else metric
    return build_loader(cfg.data, split, 0, 1, tokenizer, train=False), tokenizer.decode, metric


def auto_metric(cfg) -> str:
    """--metric auto: accuracy for the synthetic task, wer for transcripts, bleu for translations (and text)."""
    if cfg.synthetic is not None:
        return "accuracy"
    if cfg.data.target == "transcript":
        return "wer"
    if cfg.data.target == "translation" or cfg.data.modality == "text":
        return "bleu"
    raise ValueError("data.target=auto on a speech corpus may mix ASR and ST: pass --metric wer or bleu")


def run(args: argparse.Namespace, load_fn: LoadFn | None = None) -> dict:
    """Everything `main` does after parsing, with an injectable checkpoint reader."""
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    verify = not getattr(args, "no_verify", False)
    overrides = data_overrides(getattr(args, "overrides", []))
    paths = resolve_checkpoints(args.checkpoint, args.checkpoint_root, args.average_last, verify)
    cfg, model, task_names = load_model(paths, load_fn, device, verify, overrides)
    batches, decode, metric = eval_inputs(cfg, args.split, args.metric)
    if getattr(args, "utterances_per_task", 0):
        batches = first_utterances(batches, args.utterances_per_task, args.group_by)
    result = evaluate(
        model,
        batches,
        decode,
        task_names,
        metric,
        beam=args.beam,
        max_len_a=args.max_len_a,
        max_len_b=args.max_len_b,
        length_penalty=args.lenpen,
        group_by=args.group_by,
        device=device,
        keep_outputs=args.keep_outputs,
        progress=not getattr(args, "quiet", False),
    )
    result["checkpoints"] = [str(p) for p in paths]
    result["split"] = args.split
    return result


def main(argv: list[str] | None = None, load_fn: LoadFn | None = None) -> int:
    parser = build_parser()
    args, args.overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.beam < 1:
        print(f"hs-scale evaluate: --beam {args.beam} must be >= 1", file=sys.stderr)
        return 2
    if args.utterances_per_task < 0:
        print(f"hs-scale evaluate: --utterances-per-task {args.utterances_per_task} must be >= 0 (0: all)",
              file=sys.stderr)
        return 2
    from hs_scale.checkpoint import CheckpointError

    try:
        result = run(args, load_fn)
    except (FileNotFoundError, ValueError, CheckpointError) as err:
        print(f"hs-scale evaluate: {err}", file=sys.stderr)
        return 2
    print(result["table"])
    if args.out:
        print(f"wrote {write_results(result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
