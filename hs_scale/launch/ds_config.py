"""The DeepSpeed config (ds_config) an hs_scale config implies, and a check of a hand-written one against it.

    python -m hs_scale.launch.ds_config --config configs/x.yaml --parallel.engine deepspeed --parallel.zero_stage 2
    python -m hs_scale.launch.ds_config --config configs/x.yaml [overrides] --check launchers/deepspeed/ds_config.json

hs_scale has one source of truth, its own config: the DeepSpeed engine (hs_scale.training.engine) builds its
ds_config from `train:` and `parallel:` with hs_scale.parallel.data_parallel.deepspeed_config, so the launcher needs
no ds_config file. This module prints that ds_config (for review, or for tools that want a file) and refuses a
ds_config file that disagrees with the hs_scale config on anything the engine sets (ZeRO stage, bf16, clipping,
batch bookkeeping): the run would otherwise not be the configured one.
"""

from __future__ import annotations

import argparse
import json
import sys


def derive(cfg) -> dict:
    """The ds_config the engine uses for `cfg`: hs_scale.parallel.data_parallel.deepspeed_config, with the trainer's
    settings (it sums its micro-batches before one backward, hence gradient_accumulation_steps 1)."""
    from hs_scale.parallel.data_parallel import deepspeed_config

    return deepspeed_config(cfg.parallel, clip_norm=cfg.train.clip_norm)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# hs_scale owns these; a ds_config must not set them (the engine uses a client AdamW and its own schedule).
FORBIDDEN = {
    "optimizer": "the optimizer is train.lr/betas/eps/weight_decay (hs_scale passes a torch AdamW to DeepSpeed)",
    "scheduler": "the LR schedule is train.schedule/warmup_steps",
    "fp16": "fp16 is not supported (bf16: parallel.bf16)",
    "train_batch_size": "the global batch is set by the data/synthetic section, not by DeepSpeed",
}


def check(ds_config: dict, cfg) -> list[str]:
    """Problems of a ds_config file against the hs_scale config (empty: consistent)."""
    problems = []
    if cfg.parallel.engine != "deepspeed":
        problems.append(f"parallel.engine={cfg.parallel.engine!r}: a ds_config is only used with --parallel.engine "
                        "deepspeed")
    for key, why in FORBIDDEN.items():
        if key in ds_config and not (key == "fp16" and not ds_config[key].get("enabled", False)):
            problems.append(f"ds_config sets {key!r}; remove it: {why}")
    want, have = _flatten(derive(cfg)), _flatten(ds_config)
    for key, value in want.items():
        if key in have and have[key] != value:
            problems.append(f"ds_config {key}={have[key]!r} but the hs_scale config implies {value!r}; "
                            f"change the file or the hs_scale config")
    stage = have.get("zero_optimization.stage", 0)
    if stage not in (0, 1, 2):
        problems.append(f"zero_optimization.stage={stage}: hs_scale supports ZeRO 0, 1 and 2")
    return problems


def main(argv: list[str] | None = None) -> int:
    from hs_scale.config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="python -m hs_scale.launch.ds_config", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config")
    parser.add_argument("--check", help="a ds_config JSON to validate against the hs_scale config")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"invalid config: {err}", file=sys.stderr)
        return 2
    if args.check:
        with open(args.check) as f:
            problems = check(json.load(f), cfg)
        for p in problems:
            print(f"{args.check}: {p}", file=sys.stderr)
        if not problems:
            print(f"{args.check}: consistent with the hs_scale config")
        return 1 if problems else 0
    print(json.dumps(derive(cfg), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
