"""Where metrics go: a JSONL log (one object per line), the console, TensorBoard when installed, and Weights &
Biases when asked for (`train.wandb`: offline or online).

After a resume, the steps between the checkpoint and the last step logged before the interruption are trained
again: `mark_resume` appends a {"kind": "resume", "step": S, "recomputed_until": M} line and every record of a
step <= M logged afterwards carries "recomputed": true, so a reader keeps the last value of each step (or drops
the superseded ones) instead of seeing unexplained duplicates.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm


class MetricsLogger:
    def __init__(self, output_dir: str | Path, tensorboard: bool = True, echo: bool = True, wandb: str = "off",
                 wandb_project: str = "hs_scale", config: dict | None = None):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self.echo = echo
        self.recompute_until = -1
        self.tb_writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb_writer = SummaryWriter(str(self.dir / "tensorboard"))
            except ImportError:  # tensorboard is a declared dependency; tolerate a minimal environment
                self.tb_writer = None
        self.wandb_run = None if wandb == "off" else _start_wandb(self.dir, wandb, wandb_project, config)

    def mark_resume(self, step: int) -> None:
        """Record that training continues from checkpoint `step` (see module docstring)."""
        last = -1
        if self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):  # a line cut by a kill mid-write: drop it
                with self.path.open("r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
            for line in self.path.read_text().splitlines():
                try:
                    last = max(last, int(json.loads(line).get("step", -1)))
                except (ValueError, TypeError, AttributeError):  # a line cut by a kill: skip it
                    continue
        self.recompute_until = last if last > step else -1
        with self.path.open("a") as f:
            f.write(json.dumps({"kind": "resume", "step": step, "recomputed_until": max(last, step),
                                "time": time.time()}) + "\n")

    def log(self, kind: str, step: int, values: dict) -> None:
        record = {"kind": kind, "step": step, "time": time.time(), **values}
        if step <= self.recompute_until:
            record["recomputed"] = True
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb_writer is not None:
            for key, value in _flatten(values).items():
                self.tb_writer.add_scalar(f"{kind}/{key}", value, step)
        if self.wandb_run is not None and step > self.recompute_until:  # W&B steps only go forward
            self.wandb_run.log({f"{kind}/{k}": v for k, v in _flatten(values).items()}, step=step)
        if self.echo:
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in _flatten(values).items())
            tqdm.write(f"[{kind} {step}] {shown}")

    def log_selection(self, step: int, tables: dict, task_names: list[str]) -> None:
        """The deterministic selection table {site: table[task][layer] = heads} (W&B: a table per evaluation)."""
        if self.wandb_run is None:
            return
        import wandb

        rows = [[site, task_names[k], layer, ",".join(map(str, heads))]
                for site, table in tables.items() for k, per_layer in enumerate(table)
                for layer, heads in enumerate(per_layer)]
        self.wandb_run.log({"selection": wandb.Table(columns=["site", "task", "layer", "heads"], data=rows)},
                           step=step)

    def close(self) -> None:
        if self.tb_writer is not None:
            self.tb_writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _start_wandb(out: Path, mode: str, project: str, config: dict | None):
    try:
        import wandb
    except ImportError:
        raise ValueError(f"train.wandb={mode} needs the wandb package: pip install 'hs-scale[track]' "
                         "(or set train.wandb=off)") from None
    return wandb.init(project=project, name=out.name, dir=str(out), mode=mode, config=config or {},
                      settings=wandb.Settings(console="off", silent=True))


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
