"""Console output a person reads: each third-party warning that matters once, on rank 0; the rest silenced.

Called first thing in every training process (`hs-scale train`, i.e. torchrun / DeepSpeed / srun ranks, and each
Ray Train worker), before megatron-core, DeepSpeed or Ray's training code is imported, because megatron warns at
import time (five warnings per rank, four of them "Transformer Engine and Apex are not installed").

- ranks > 0: Python warnings from third-party code are ignored and the megatron / DeepSpeed / Ray loggers only pass
  errors; hs_scale's own warnings still show (they are about this run, and rank-specific).
- rank 0: a warning is shown once per process, keyed by its category and first sentence (megatron repeats "Transformer
  Engine and Apex are not installed." from four modules with different endings), as one line
  `warning (package): Category: message` instead of a path and a source line; the same once-rule applies to log
  records of those loggers. INFO chatter of megatron (under Ray, its full gradient-bucket parameter list) and
  DeepSpeed (config dumps) is hidden: their warnings and errors still show.
- `NOISE` lists warnings that say nothing a user can act on and are silenced on every rank, each with the reason.
- On a machine without CUDA, DS_ACCELERATOR=cpu is set (what DeepSpeed would pick anyway), which spares its
  "Setting accelerator to CPU. If you have GPU ..." banner in every process.

HS_SCALE_VERBOSE_WARNINGS=1 turns all of this off (every warning, every rank, Python's default format).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

# Loggers of the libraries we drive; their children inherit the level.
THIRD_PARTY_LOGGERS = ("megatron", "DeepSpeed", "deepspeed", "ray.train", "ray.tune", "torch.distributed")
OUR_PACKAGES = r"(hs_scale|data_pipelines)(\.|$)"

# (regex on the message, why it says nothing to a user of hs_scale): silenced on every rank.
NOISE = (
    (r"full scope is deprecated", "megatron-core's TransformerConfig warns about its own default cuda_graph_scope"),
    (r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
     "DeepSpeed ZeRO calls the deprecated torch API, not hs_scale; nothing to change on our side"),
)

_done = False


def _rank() -> int:
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _key(category: type, message: str) -> tuple[str, str]:
    """A warning's identity for deduplication: its category and first sentence."""
    first = re.split(r"(?<=[.!?])\s", message.strip(), maxsplit=1)[0]
    return category.__name__, first


class _Once(logging.Filter):
    """Passes each distinct (level, first sentence) of the third-party loggers once, from `min_level` on (a filter,
    not only a logger level: DeepSpeed sets its logger's level when it is imported, after us)."""

    def __init__(self, min_level: int):
        super().__init__()
        self.min_level = min_level
        self.seen: set[tuple] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(THIRD_PARTY_LOGGERS):
            return True
        if record.levelno < self.min_level:
            return False
        key = (record.levelno, *_key(Warning, record.getMessage()))
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def _package(filename: str) -> str:
    """site-packages/megatron/core/optimizer/x.py -> megatron (who warned, without a long path)."""
    parts = filename.replace("\\", "/").split("/")
    for marker in ("site-packages", "dist-packages"):
        if marker in parts and parts.index(marker) + 1 < len(parts):
            return parts[parts.index(marker) + 1]
    return os.path.basename(filename)


def quiet(rank: int | None = None) -> None:
    """Install the warning and logging policy of this process (idempotent). `rank` defaults to RANK/SLURM_PROCID."""
    global _done
    if _done or os.environ.get("HS_SCALE_VERBOSE_WARNINGS") == "1":
        return
    _done = True
    rank = _rank() if rank is None else rank
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"

    if rank > 0:
        warnings.simplefilter("ignore")
        warnings.filterwarnings("default", module=OUR_PACKAGES)  # inserted first: ours still show
    for pattern, _why in NOISE:
        warnings.filterwarnings("ignore", message=pattern)

    if rank == 0:
        seen: set[tuple[str, str]] = set()
        show = warnings.showwarning

        def show_once(message, category, filename, lineno, file=None, line=None):
            key = _key(category, str(message))
            if key in seen:
                return
            seen.add(key)
            if re.match(OUR_PACKAGES, _package(filename)) or "hs_scale" in filename:
                show(message, category, filename, lineno, file, line)
                return
            print(f"warning ({_package(filename)}): {category.__name__}: {message}", file=file or sys.stderr,
                  flush=True)

        warnings.showwarning = show_once
        # Every repeat reaches show_once (which dedupes): Python's per-location registry would otherwise also be
        # reset by libraries that touch the filters, and print the same warning again.
        warnings.filterwarnings("always", category=Warning, append=True)

    level = logging.WARNING if rank == 0 else logging.ERROR
    once = _Once(level)
    for name in THIRD_PARTY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.addFilter(once)  # records logged on this very logger (DeepSpeed logs on "DeepSpeed")
    for handler in [*logging.getLogger().handlers, logging.lastResort]:  # records of child loggers propagate here
        if handler is not None:
            handler.addFilter(once)
