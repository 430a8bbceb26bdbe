"""The `hs-scale` command line.

    hs-scale train --config configs/synthetic.yaml [--section.field value ...]
    hs-scale show-config --config FILE [overrides]      resolved config, validated, as YAML
    hs-scale show-config --describe [--config FILE]     ... with every field's description and default
    hs-scale prepare-data --recipe NAME --out DIR       build a corpus (see data_pipelines/)
    hs-scale evaluate --checkpoint DIR [...]            greedy / beam decoding, WER or BLEU per task
    hs-scale export-hf --checkpoint DIR --task T --out DIR   dense per-task Hugging Face model (or --all-tasks)
    hs-scale import-hf --model DIR --pool-size P --tasks a,b --out DIR   upcycle a dense HF model
    hs-scale demo                                       the built-in multilingual ASR demo (make demo)
    hs-scale heads importance|adapt|plot ...            LAHIS head importance, soft head-mask adaptation, head figures

Exit codes of `train`: 0 done; 2 refused (bad config, corrupt checkpoint, locked output dir, incompatible
resume, failed save: one `error: ...` line on rank 0, no traceback; HS_SCALE_TRACEBACK=1 shows it); 75 stopped
cleanly on SIGTERM/SIGINT/SIGUSR1 after saving a checkpoint (rerun to resume); anything else is a bug (traceback).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

from hs_scale.config import ConfigError, dump_config, load_config

# Sub-commands with their own argument parsers (module, function taking argv).
_DELEGATED = {
    "prepare-data": ("data_pipelines.cli", "main"),
    "evaluate": ("hs_scale.evaluation.cli", "main"),
    "export-hf": ("hs_scale.export.cli", "main_export"),
    "import-hf": ("hs_scale.export.cli", "main_import"),
    "demo": ("hs_scale.demo", "main"),
    "heads": ("hs_scale.analysis.cli", "main"),
}


_OVERRIDES = ("Any config field can be set after the options: --section.field VALUE or --section.field=VALUE "
              "(VALUE is read as YAML), e.g. --train.steps 100 --selection.strategy subset. "
              "`hs-scale show-config --describe` lists every field with its description and default.")


def _config_parser(name: str, sub, help_text: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=f"{help_text}. {_OVERRIDES}")
    parser.add_argument("--config", help="YAML config file (defaults are used for anything it leaves out)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:
        module, function = _DELEGATED[argv[0]]
        return getattr(importlib.import_module(module), function)(argv[1:])
    parser = argparse.ArgumentParser(prog="hs-scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _config_parser("train", sub, "train a model")
    show = _config_parser("show-config", sub, "print the resolved, validated config")
    show.add_argument("--describe", action="store_true",
                      help="add each field's description (from its dataclass) and its default as YAML comments")
    for name in _DELEGATED:
        sub.add_parser(name, help=f"see hs-scale {name} --help")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: invalid config: {err}", file=sys.stderr)
        return 2
    if args.command == "show-config":
        if args.describe:
            from hs_scale.config_help import describe

            print(describe(cfg))
        else:
            print(dump_config(cfg), end="")
        return 0
    return _train(cfg)


def _train(cfg) -> int:
    from hs_scale.launch.quiet import quiet

    quiet()  # before megatron/DeepSpeed are imported: each third-party warning once, on rank 0
    from hs_scale.checkpoint import CheckpointError
    from hs_scale.checkpoint.lock import OutputDirLockedError
    from hs_scale.training.loop import EXIT_PREEMPTED, NonFiniteLossError, Preempted
    from hs_scale.training.run import train

    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        train(cfg)
    except Preempted as stop:
        if rank0:
            print(f"hs-scale train: {stop}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    # Errors every rank raises alike (checked on rank 0, or deterministic): one line, said once.
    except (ConfigError, CheckpointError, OutputDirLockedError, NonFiniteLossError, ValueError,
            FileNotFoundError) as err:
        if os.environ.get("HS_SCALE_TRACEBACK"):
            raise
        line = "error: " + " ".join(str(err).split())
        if rank0:
            print(line, file=sys.stderr, flush=True)
        _tell_torchrun(line)
        return 2
    return 0


def _tell_torchrun(line: str) -> None:
    """torchrun prints a worker's error file in its end-of-run summary: make that our one line, not a pointer to
    the docs on how to get a traceback."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w") as f:
                json.dump({"message": line, "timestamp": int(time.time())}, f)
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
