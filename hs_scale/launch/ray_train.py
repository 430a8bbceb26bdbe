"""Ray Train entry: run `hs_scale.training.run.train` on N Ray workers with the same config as every other launcher.

    python -m hs_scale.launch.ray_train --config configs/synthetic.yaml --num-workers 2 \\
        --storage-path /shared/ray_results --name synth --max-failures 2 [--use-gpu] [--train.steps 200 ...]

Usually started through `ray job submit` (launchers/ray/submit.sh). Arguments this entry does not know are
config overrides, exactly as for `hs-scale train`. The driver resolves and validates the config once and ships the
resolved YAML to the workers, so every worker trains the very same config.

Checkpoints: hs_scale writes its own checkpoints under `train.output_dir`; after each one, rank 0 reports it to
Ray (`ray.train.report(metrics, checkpoint=Checkpoint.from_directory(path))`, the other ranks report metrics only),
and Ray persists it under `{storage_path}/{name}`. When a worker dies, Ray restarts the whole worker group (up to
`--max-failures` times) and every worker resumes from `ray.train.get_checkpoint()`, i.e. the last *reported*
checkpoint: steps after it are recomputed from that state, so no step is applied twice to the final weights.
That checkpoint is verified (COMPLETE + sha256) before it is loaded, like every other load. Every restart of one
`fit()` carries the same HS_SCALE_RUN_ID, so a restarted rank 0 may take over the output dir's lock left by the
worker that died (on any node); another submission is refused while the lock is held.

A relative `train.output_dir` is placed under the storage path (workers of a `ray job` run in an unpacked copy of
the working dir, which is not where you want outputs). Multi-node: storage path and output_dir on shared storage.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import tempfile
import uuid
from pathlib import Path

ENTRY = "hs_scale.training.run:train"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hs_scale.launch.ray_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="hs_scale YAML config (as for `hs-scale train`)")
    p.add_argument("--num-workers", type=int, default=1, help="training workers (ranks)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (nccl); default CPU (gloo)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpus-per-worker", type=float, default=None, help="with --use-gpu (default 1)")
    p.add_argument("--resources-per-worker", default=None,
                   help='extra custom resources per worker as JSON, e.g. \'{"accelerator_type:H100": 0.01}\'')
    p.add_argument("--storage-path", default=os.environ.get("HS_RAY_STORAGE", "~/ray_results"),
                   help="where Ray persists checkpoints and results (shared FS or s3:// for multi-node)")
    p.add_argument("--name", default="hs_scale", help="run name (folder under the storage path)")
    p.add_argument("--max-failures", type=int, default=1, help="worker-group restarts before giving up (-1: no limit)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS / the job's cluster)")
    p.add_argument("--entry", default=ENTRY, help=argparse.SUPPRESS)  # module:function with train()'s signature
    return p


def resolve_config(config: str | None, overrides: list[str], storage_path: str, name: str):
    """Load + validate once on the driver; a relative output_dir goes under {storage_path}/{name}/."""
    from hs_scale.config import dump_config, load_config

    cfg = load_config(config, overrides)
    if not os.path.isabs(cfg.train.output_dir) and "://" not in storage_path:
        base = Path(os.path.expanduser(storage_path)).resolve() / name
        cfg = load_config(config, [*overrides, "--train.output_dir", str(base / cfg.train.output_dir)])
    return cfg, dump_config(cfg)


def _run_id() -> str:
    """Shared by every restart of this fit(); under Slurm, by every requeue of the job too (same job id)."""
    job = os.environ.get("SLURM_JOB_ID")
    return f"SLURM_JOB_ID={job}" if job else f"ray-{uuid.uuid4().hex}"


def _load_entry(spec: str):
    module, _, func = spec.partition(":")
    return getattr(importlib.import_module(module), func)


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs on every Ray worker: TorchTrainer has already initialised the process group (gloo / nccl)."""
    import ray.train

    from hs_scale.config import load_config
    from hs_scale.launch.quiet import quiet

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    quiet(rank)  # before the entry imports megatron/DeepSpeed: each third-party warning once, on rank 0
    _plain_print()
    os.environ["HS_SCALE_RUN_ID"] = loop_config["run_id"]  # restarts of this fit() own the output dir's lock
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(loop_config["config_yaml"])
        cfg = load_config(str(path), [])

    def on_checkpoint(path: str, step: int, metrics: dict) -> None:
        scalars = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        checkpoint = ray.train.Checkpoint.from_directory(path) if rank == 0 else None
        ray.train.report({**scalars, "step": step}, checkpoint=checkpoint)

    train = _load_entry(loop_config["entry"])
    kwargs = {"on_checkpoint": on_checkpoint} if "on_checkpoint" in inspect.signature(train).parameters else {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        train(cfg, **kwargs)
    else:
        with checkpoint.as_directory() as resume_dir:  # local storage: the directory itself; remote: a download
            print(f"[ray_train rank {rank}] resuming from {resume_dir}", flush=True)
            train(cfg, resume_from=resume_dir, **kwargs)
    sys.stdout.flush()


def _plain_print() -> None:
    """Undo Ray Train's print patch in this worker. Ray Train (V2) replaces `print` with one that writes the line to
    stdout and also logs it on the root logger, whose console handler shows it again: every line hs_scale prints
    (the end-of-run summary, the selection table, warnings) reached the console twice. RAY_TRAIN_ENABLE_PRINT_PATCH=0
    turns the patch off only if it is in the worker's environment before Ray starts the worker, which a job cannot
    guarantee, hence this (the module is private: on another Ray layout nothing is changed). Also line-buffer
    stdout (a file under Ray), so lines arrive in order and on time."""
    import builtins

    try:
        from ray.train.v2._internal.logging.patch_print import _original_print
    except ImportError:
        _original_print = None
    if _original_print is not None:
        builtins.print = _original_print
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)


def _one_line(error: BaseException) -> str:
    """The innermost cause of a worker's failure (Ray wraps it in its own errors), on one line."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if len(text) < 2000 else f"{type(error).__name__}: {text[:2000]}..."


def main(argv: list[str] | None = None) -> int:
    args, overrides = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    import json

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from hs_scale.config import ConfigError

    try:
        cfg, config_yaml = resolve_config(args.config, overrides, args.storage_path, args.name)
    except ConfigError as err:
        print(f"hs_scale.launch.ray_train: invalid config: {err}", file=sys.stderr)
        return 2
    resources = {"CPU": args.cpus_per_worker}
    if args.use_gpu:
        resources["GPU"] = args.gpus_per_worker if args.gpus_per_worker is not None else 1
    if args.resources_per_worker:
        resources.update(json.loads(args.resources_per_worker))
    if args.address or not ray.is_initialized():
        ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or "auto")
    storage = args.storage_path if "://" in args.storage_path else str(Path(args.storage_path).expanduser().resolve())
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config_yaml": config_yaml, "entry": args.entry, "run_id": _run_id()},
        torch_config=TorchConfig(backend="nccl" if args.use_gpu else "gloo",
                                 timeout_s=cfg.parallel.timeout_minutes * 60),
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=args.name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=args.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=None)),
    )
    result = trainer.fit()
    ckpt = result.checkpoint.path if result.checkpoint else None
    print(f"hs_scale.launch.ray_train: finished; output_dir={cfg.train.output_dir} last checkpoint={ckpt}",
          flush=True)
    if result.error:
        print(f"hs_scale.launch.ray_train: failed: {_one_line(result.error)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
