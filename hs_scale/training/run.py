"""`hs-scale train`: the one training entry point every launcher ends in (torchrun, DeepSpeed, Slurm, Ray).

    train(cfg)                                         # single process, or the launcher's world from env vars
    train(cfg, on_checkpoint=report, resume_from=dir)  # Ray Train: report checkpoints, resume after a failure

Order of a start (hs_scale/training/resume.py for the decisions): rank 0 takes the output dir's lock
(hs_scale/checkpoint/lock.py) and removes leftovers of killed saves; the ranks agree on what to start from (the
latest verified checkpoint, checked against this config; `train.init_from` weights; nothing); only then rank 0
writes config.yaml, so a refused run never overwrites the config of the run whose checkpoints are there.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from hs_scale.config import Config, dump_config
from hs_scale.data.features import use_global_cmvn
from hs_scale.models import build_model
from hs_scale.seeding import seed_everything
from hs_scale.selection.selector import format_selection_table
from hs_scale.training.data_source import build_source
from hs_scale.training.decode_eval import DecodeEvaluator, skip_reason, summary_line
from hs_scale.training.distributed import init_distributed
from hs_scale.training.engine import StepEngine
from hs_scale.training.loop import Trainer
from hs_scale.training.metrics import MetricsLogger
from hs_scale.training.resume import load_init_weights, on_rank0, start_plan


def _check_vocab(cfg: Config, source) -> None:
    tok = source.tokenizer
    if tok is None:
        needed = cfg.synthetic.vocab_size
        if cfg.model.vocab_size < needed:
            raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the synthetic task's "
                             f"vocabulary; set model.vocab_size >= {needed}")
        return
    if cfg.model.vocab_size != tok.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} but the tokenizer has {tok.vocab_size} pieces; "
                         f"set model.vocab_size={tok.vocab_size}")
    for field, ours in (("pad_token_id", tok.pad_id), ("eos_token_id", tok.eos_id)):
        if getattr(cfg.model, field) != ours:
            raise ValueError(f"model.{field}={getattr(cfg.model, field)} but the tokenizer's is {ours}; "
                             f"set model.{field}={ours}")


def _parallel_groups(cfg: Config, env):
    """megatron-core process groups for a multi-process run (None for a single process)."""
    if not env.distributed:
        if cfg.parallel.model_parallel > 1:
            raise ValueError("parallel.tensor_parallel x pipeline_parallel > 1 needs that many processes; "
                             "start with torchrun --nproc-per-node N (see README, launch paths)")
        return None
    from hs_scale.parallel.layout import init_parallel_groups

    return init_parallel_groups(cfg.parallel, seed=cfg.train.seed)


def _checkpoint_manager(cfg: Config, out: Path):
    from hs_scale.checkpoint import CheckpointManager

    return CheckpointManager(out / "checkpoints", keep_last=cfg.train.keep_last, on_corrupt=cfg.train.on_corrupt)


def train(cfg: Config, *, on_checkpoint: Callable[[str, int, dict], None] | None = None,
          resume_from: str | None = None) -> dict:
    """Train as configured; returns the final evaluation. Rank 0 writes config, metrics, heatmaps and results."""
    from hs_scale.checkpoint.lock import OutputDirLock
    from hs_scale.checkpoint.ranks import coords

    env = init_distributed(cfg.train.device, cfg.parallel.timeout_minutes)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out = Path(cfg.train.output_dir)
    world = coords(None)
    lock = OutputDirLock(out, force=cfg.train.force_unlock)
    on_rank0(lock.acquire, world)
    try:
        return _train(cfg, env, out, world, on_checkpoint, resume_from)
    finally:
        lock.release()


def _train(cfg: Config, env, out: Path, world, on_checkpoint, resume_from: str | None) -> dict:
    checkpoints = _checkpoint_manager(cfg, out)
    if env.is_main:
        for stale in checkpoints.clean_stale():  # safe: we hold the lock, nobody else is saving here
            print(f"removed {stale.name}, left by an interrupted save", flush=True)
    plan = start_plan(cfg, checkpoints, world, resume_from)
    if env.is_main:
        (out / "config.yaml").write_text(dump_config(cfg))
    groups = _parallel_groups(cfg, env)
    dp_rank, dp_size = (0, 1) if groups is None else (groups.dp_rank, groups.dp_size)

    seed_everything(cfg.train.seed)  # identical initial parameters on every rank
    source = build_source(cfg.data, cfg.synthetic, dp_rank, dp_size, cfg.train.grad_accum)
    _check_vocab(cfg, source)
    num_tasks = len(source.task_names)
    model_parallel = cfg.parallel.model_parallel > 1
    model = build_model(cfg.model, cfg.selection, num_tasks=num_tasks)
    use_global_cmvn(model, cfg.data)  # data.cmvn=global is applied inside the model (hs_scale.data.features)
    if plan.init and not model_parallel:  # before the engine: DeepSpeed/ZeRO copy the weights into their partitions
        load_init_weights(*plan.init, model.to(env.device), groups, cfg, num_tasks)
    engine = StepEngine(model.to(env.device), cfg.train, cfg.selection, cfg.parallel, groups, num_tasks, env.device)
    if plan.init and model_parallel:  # into this rank's chunks (the checkpoint's layout may differ)
        load_init_weights(*plan.init, engine.checkpoint_model, groups, cfg, num_tasks)
    if plan.init and env.is_main:
        print(f"initialised from {plan.init[1]} (step 0, new optimizer)", flush=True)
    split = getattr(source, "eval_split", "valid")
    skipped = skip_reason(cfg)
    if skipped and env.is_main:
        print(skipped, flush=True)
    decoder = DecodeEvaluator.build(cfg, engine, groups, split, source.task_names)
    seed_everything(cfg.train.seed + 1000 * dp_rank)  # different dropout masks per replica
    logger = (MetricsLogger(out, wandb=cfg.train.wandb, wandb_project=cfg.train.wandb_project, config=cfg.to_dict())
              if env.is_main else None)
    trainer = Trainer(cfg.train, cfg.selection, engine, source, logger, checkpoints,
                      cfg.to_dict(), env.is_main, groups, on_checkpoint, decoder)
    if plan.resume:
        trainer.restore(plan.resume, verify=False)  # start_plan verified it
    result = trainer.fit()
    if env.is_main:
        table = trainer.last_table  # the final evaluation's (gathered over TP / PP ranks)
        written = ["config.yaml", "metrics.jsonl", "result.json", "checkpoints/"]
        if table is not None:
            text = format_selection_table(table, source.task_names)
            (out / "selection.txt").write_text(text + "\n")
            print(text)
            written += ["selection.txt", "heatmaps/"]
        decoded = summary_line(result, split)
        if decoded:
            print(decoded)
        (out / "result.json").write_text(json.dumps(result, indent=2))
        if logger.tb_writer is not None:
            written.append("tensorboard/")
        if logger.wandb_run is not None:
            written.append("wandb/")
        logger.close()
        print(f"outputs in {out}: {' '.join(written)}")
    return result
