"""Where metrics go: a JSONL log (one object per line), the console, and TensorBoard when installed."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm


class MetricsLogger:
    def __init__(self, output_dir: str | Path, tensorboard: bool = True, echo: bool = True):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self.echo = echo
        self.tb_writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb_writer = SummaryWriter(str(self.dir / "tensorboard"))
            except ImportError:  # tensorboard is a declared dependency; tolerate a minimal environment
                self.tb_writer = None

    def log(self, kind: str, step: int, values: dict) -> None:
        record = {"kind": kind, "step": step, "time": time.time(), **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb_writer is not None:
            for key, value in _flatten(values).items():
                self.tb_writer.add_scalar(f"{kind}/{key}", value, step)
        if self.echo:
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in _flatten(values).items())
            tqdm.write(f"[{kind} {step}] {shown}")

    def close(self) -> None:
        if self.tb_writer is not None:
            self.tb_writer.close()


def _flatten(values: dict, prefix: str = "") -> dict[str, float]:
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = value
    return flat


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
