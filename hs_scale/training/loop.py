"""The trainer: steps, logging, evaluation, checkpoints and exact resume.

It meets the rest of the system through four small seams, declared below as Protocols: a batch source
(`BatchSource`: hs_scale.training.data_source), a step engine (`Engine`: hs_scale.training.engine), a checkpointer
(`Checkpointer`: hs_scale.checkpoint.CheckpointManager) and a metrics logger.

Preemption: SIGTERM, SIGINT and SIGUSR1 (what schedulers send before they kill: Slurm's `--signal`, Kubernetes,
torchrun forwarding its own SIGTERM) only set a flag. At every step boundary the ranks agree on it with one
all-reduce (any rank signalled = every rank stops at the same step), save a checkpoint and raise `Preempted`,
which `hs-scale train` turns into exit code 75 (EX_TEMPFAIL: "try again"); rerunning resumes exactly. A second
SIGINT stops at once (KeyboardInterrupt). Handlers are installed only in the main thread (Ray Train runs the loop
in a worker thread: its restarts resume from the last reported checkpoint instead).
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from torch import nn
from tqdm import tqdm

from hs_scale.parallel.layout import ParallelGroups
from hs_scale.selection.config import SelectionConfig
from hs_scale.training.config import TrainConfig
from hs_scale.training.engine import StepResult
from hs_scale.training.heatmap import count_changes, write_heatmap
from hs_scale.training.metrics import MetricsLogger


class Engine(Protocol):
    """One optimizer step on some layout (hs_scale.training.engine.StepEngine)."""

    optimizer: Any  # a torch optimizer, or a view with its state_dict / load_state_dict (ZeRO)
    scheduler: Any  # torch LR scheduler (get_last_lr, state_dict)
    dp_size: int  # data-parallel replicas
    world_size: int  # every device of the run (dp x tp x pp): MFU divides by it

    @property
    def checkpoint_model(self) -> nn.Module | list[nn.Module]: ...

    def set_temperature(self, tau: float) -> None: ...

    def train_step(self, microbatches: list) -> StepResult: ...

    def evaluate(self, batches: Iterable, task_names: list[str]) -> dict: ...

    def selection_table(self) -> dict: ...

    def flops(self, batch) -> float: ...


class BatchSource(Protocol):
    """This data-parallel rank's batches, with a plain-typed state for exact resume."""

    task_names: list[str]

    def next_microbatches(self) -> list: ...

    def eval_batches(self) -> Iterable: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def stats(self) -> dict: ...


class Checkpointer(Protocol):
    """Saves and restores (model, optimizer, scheduler, per-rank state) on every rank
    (hs_scale.checkpoint.CheckpointManager)."""

    def save(self, step: int, model, optimizer=None, scheduler=None, extra_per_rank: dict | None = None,
             config: dict | None = None, groups: ParallelGroups | None = None,
             metrics: dict | None = None) -> Path: ...

    def load(self, path, model, optimizer=None, scheduler=None, groups: ParallelGroups | None = None,
             verify: bool = True) -> tuple[int, dict | None]: ...

    def load_latest(self, model, optimizer=None, scheduler=None,
                    groups: ParallelGroups | None = None) -> tuple[int, dict | None] | None: ...


class NonFiniteLossError(RuntimeError):
    """Raised after `train.max_nonfinite_steps` consecutive steps with a NaN/inf loss or gradient."""


PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: the run stopped cleanly on a signal and resumes when rerun


class Preempted(Exception):
    """Training stopped on a signal after saving a checkpoint (exit code EXIT_PREEMPTED)."""

    def __init__(self, signal_name: str, step: int, checkpoint: str | None):
        saved = f"checkpoint saved at {checkpoint}" if checkpoint else "no checkpoint (nothing trained yet)"
        super().__init__(f"stopped by {signal_name} at step {step}; {saved}; rerun the same command to resume")
        self.step, self.checkpoint = step, checkpoint


class Trainer:
    def __init__(self, train_cfg: TrainConfig, selection_cfg: SelectionConfig, engine: Engine, source: BatchSource,
                 logger: MetricsLogger | None, checkpoints: Checkpointer | None, config_dict: dict, is_main: bool,
                 groups: ParallelGroups | None = None, on_checkpoint: Callable[[str, int, dict], None] | None = None,
                 decoder: Callable[[], dict] | None = None):
        self.cfg, self.selection_cfg, self.engine, self.source = train_cfg, selection_cfg, engine, source
        self.decoder = decoder  # decoding metrics (hs_scale.training.decode_eval), called on every rank
        self.logger, self.checkpoints, self.config_dict = logger, checkpoints, config_dict
        self.is_main, self.groups, self.on_checkpoint = is_main, groups, on_checkpoint
        self.task_names = source.task_names
        self.step = 0
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        self.last_table = None
        self._signal: int | None = None  # the first preemption signal received (set by the handler only)
        self._saved: tuple[int, str] | None = None  # (step, folder) of the last checkpoint this run wrote

    # ------------------------------------------------------------------------------------------ state
    def _trainer_state(self) -> dict:
        return {"step": self.step, "skipped_steps": self.skipped_steps,
                "consecutive_nonfinite": self.consecutive_nonfinite, "data": self.source.state_dict()}

    def save(self, metrics: dict | None = None) -> str | None:
        if self.checkpoints is None:
            return None
        engine = self.engine
        path = self.checkpoints.save(self.step, engine.checkpoint_model, engine.optimizer, engine.scheduler,
                                     extra_per_rank=self._trainer_state(), config=self.config_dict,
                                     groups=self.groups, metrics=_finite(metrics or {}))
        self._saved = (self.step, str(path))
        if self.on_checkpoint is not None:
            self.on_checkpoint(str(path), self.step, metrics or {})
        return str(path)

    def restore(self, path: str | None = None, verify: bool = True) -> bool:
        """Load the latest complete checkpoint (or `path`, verified unless told not to); False when there is none."""
        if self.checkpoints is None:
            return False
        args = (self.engine.checkpoint_model, self.engine.optimizer, self.engine.scheduler, self.groups)
        loaded = self.checkpoints.load(path, *args, verify=verify) if path else self.checkpoints.load_latest(*args)
        if loaded is None:
            return False
        step, state = loaded
        self.step = int(step)
        if state is None:  # a different data-parallel layout: the data cursor cannot carry over
            raise ValueError(
                f"checkpoint at step {step} was written with another data-parallel size; its data-loader state does "
                "not apply here. Resume with the same parallel.data_parallel (and number of processes), or start a "
                f"new run from its weights: a new train.output_dir with --train.init_from {path or 'CHECKPOINT'}")
        self.skipped_steps = int(state["skipped_steps"])
        self.consecutive_nonfinite = int(state["consecutive_nonfinite"])
        self.source.load_state_dict(state["data"])
        if self.is_main:
            print(f"resumed from step {step}", flush=True)
            if self.logger is not None:
                self.logger.mark_resume(self.step)
        return True

    # ------------------------------------------------------------------------------------------ steps
    def train_step(self) -> dict:
        self.engine.set_temperature(self.selection_cfg.temperature_at(self.step))
        batches = self.source.next_microbatches()
        t0 = time.perf_counter()
        result = self.engine.train_step(batches)
        seconds = time.perf_counter() - t0
        if result.skipped:
            self.skipped_steps += 1
            self.consecutive_nonfinite += 1
            if self.consecutive_nonfinite >= self.cfg.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{self.consecutive_nonfinite} consecutive steps had a non-finite loss or gradient (last: loss "
                    f"{result.loss}, grad norm {result.grad_norm}) at step {self.step}; lower train.lr, raise "
                    "train.warmup_steps, or check the data for corrupt samples")
            return {"skipped": True, "loss": result.loss, "grad_norm": result.grad_norm}
        self.consecutive_nonfinite = 0
        self.step += 1
        flops = sum(self.engine.flops(b) for b in batches) * self.engine.dp_size
        metrics = {
            "loss": result.loss, "grad_norm": result.grad_norm, "lr": self.engine.scheduler.get_last_lr()[0],
            "tokens": result.tokens, "tokens_per_s": result.tokens / seconds, "step_s": seconds,
            "temperature": self.selection_cfg.temperature_at(self.step - 1),
            "tflops_per_s": flops / seconds / 1e12,
            "nll_per_task": {name: float(result.nll_per_task[k] / result.tokens_per_task[k])
                             for k, name in enumerate(self.task_names) if result.tokens_per_task[k] > 0},
        }
        if math.isfinite(result.ctc_loss):
            metrics["ctc_loss"] = result.ctc_loss
        if self.cfg.peak_tflops > 0:  # over every device of the run (dp x tp x pp)
            metrics["mfu"] = metrics["tflops_per_s"] / (self.cfg.peak_tflops * self.engine.world_size)
        return metrics

    def evaluate(self) -> dict:
        """Teacher-forced nll / accuracy on the eval split (deterministic selection), decoding metrics (WER / BLEU
        per task, when the run has a decoder), selection changes, heatmap."""
        result = self.engine.evaluate(self.source.eval_batches(), self.task_names)
        if self.decoder is not None:
            result.update(self.decoder())
        table = self.engine.selection_table()
        if table is not None:
            result["selection_changes"] = count_changes(self.last_table, table)
            self.last_table = table
        if self.is_main and table and self.logger is not None:
            self.logger.log_selection(self.step, table, self.task_names)
            write_heatmap(self.logger.dir / "heatmaps" / f"step_{self.step:06d}.png", table, self.task_names,
                          self.selection_cfg.pool_heads, f"selected heads at step {self.step}",
                          self.logger.tb_writer, self.step)
        return result

    # ------------------------------------------------------------------------------------------ loop
    def fit(self) -> dict:
        with self._preemption_handlers():
            return self._fit()

    @contextlib.contextmanager
    def _preemption_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
            if self._signal is None:
                self._signal = signum
                if self.is_main:
                    print(f"\n{signal.Signals(signum).name} received: stopping at the end of this step to save a "
                          "checkpoint (Ctrl-C again to stop without saving)", flush=True)

        previous = {s: signal.signal(s, handler) for s in PREEMPT_SIGNALS}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _stop_requested(self) -> bool:
        """True on every rank when any rank got a preemption signal (one all-reduce per step)."""
        from hs_scale.checkpoint.ranks import any_rank, coords

        return any_rank(self._signal is not None, coords(self.groups))

    def _stop(self) -> None:
        name = signal.Signals(self._signal).name if self._signal is not None else "a signal on another rank"
        self._log("preempted", {"signal": name})
        if self._saved is not None and self._saved[0] == self.step:  # this step's checkpoint is already written
            path = self._saved[1]
        else:
            path = self.save() if self.step > 0 else None
        raise Preempted(name, self.step, path)

    def _fit(self) -> dict:
        cfg = self.cfg
        start, window = time.perf_counter(), []
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (self.is_main and cfg.progress_bar),
                   dynamic_ncols=True, mininterval=2.0)
        while self.step < cfg.steps:
            if self._stop_requested():
                bar.close()
                self._stop()
            metrics = self.train_step()
            if metrics.get("skipped"):
                self._log("skip", metrics)
                continue
            bar.update(1)
            window.append(metrics["tokens_per_s"])
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}",
                            tok_s=f"{sum(window[-20:]) / len(window[-20:]):.0f}", refresh=False)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self._log("train", metrics)
            evaluated = None
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                evaluated = self.evaluate()
                self._log("eval", evaluated)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save(evaluated or metrics)
        bar.close()
        result = self.evaluate()
        result["wall_s"] = time.perf_counter() - start
        result["skipped_steps"] = self.skipped_steps
        data_stats = self.source.stats()
        if data_stats:
            result["data"] = data_stats
        self._log("eval", result)
        self.save(result)
        return result

    def _log(self, kind: str, values: dict) -> None:
        if self.is_main and self.logger is not None:
            self.logger.log(kind, self.step, {k: v for k, v in values.items() if not _is_nan(v)})


def _finite(values: dict) -> dict:
    """Numbers only, without NaN/inf (checkpoint metadata is strict JSON)."""
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def _is_nan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)
