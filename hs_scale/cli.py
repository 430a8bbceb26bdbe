"""The `hs-scale` command line.

    hs-scale train --config configs/synthetic.yaml [--section.field value ...]
    hs-scale show-config --config FILE [overrides]      resolved config, validated, as YAML
    hs-scale prepare-data --recipe NAME --out DIR       build a corpus (see data_pipelines/)
"""

from __future__ import annotations

import argparse
import sys

from hs_scale.config import ConfigError, dump_config, load_config


def _config_parser(name: str, sub, help_text: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text)
    parser.add_argument("--config", help="YAML config file (defaults are used for anything it leaves out)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "prepare-data":
        from data_pipelines.cli import main as prepare_data

        return prepare_data(argv[1:])
    parser = argparse.ArgumentParser(prog="hs-scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _config_parser("train", sub, "train a model")
    _config_parser("show-config", sub, "print the resolved, validated config")
    sub.add_parser("prepare-data", help="build a corpus: hs-scale prepare-data --help")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"hs-scale: invalid config: {err}", file=sys.stderr)
        return 2
    if args.command == "show-config":
        print(dump_config(cfg), end="")
        return 0
    from hs_scale.training.run import train

    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
