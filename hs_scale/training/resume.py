"""What a run starts from: its own latest checkpoint (resume), another run's weights (`train.init_from`), or nothing.

    plan = start_plan(cfg, ckpt, c, resume_from=None)   # every rank; rank 0 checks, the others get its answer
    plan.resume   -> checkpoint folder to continue from (config checked against this run's), or None
    plan.init     -> (kind, folder) of the weights to start a new run from, or None

Resume policy (`train.resume`): "auto" continues from the latest verified checkpoint when there is one, "must"
refuses to start without one, "never" refuses to start when there is one. A resume compares the checkpoint's
config with this run's and refuses every difference outside SAFE_ON_RESUME and `train.allow_config_change`,
naming each field with both values; a checkpoint already past `train.steps` is refused (nothing to train).
When the output dir already holds checkpoints of an init_from run (preempted, requeued), resuming them wins:
init_from only ever applies to step 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hs_scale.checkpoint import CheckpointCorruptError, CheckpointError, CheckpointManager, is_step_folder
from hs_scale.checkpoint.lock import OutputDirLockedError
from hs_scale.checkpoint.manager import require_verified
from hs_scale.checkpoint.ranks import Coords, bcast_json
from hs_scale.config import ConfigError

# Fields that may change between a checkpoint and the run resuming it: bookkeeping, where things are, and the
# layout (checkpoints are reshardable; a changed data-parallel size is refused by the data cursor itself).
SAFE_ON_RESUME = {
    "train.steps", "train.log_every", "train.eval_every", "train.save_every", "train.keep_last", "train.threads",
    "train.progress_bar", "train.wandb", "train.wandb_project",
    "train.eval_decode_utterances", "train.eval_decode_beam", "train.eval_decode_max_len",
    "train.on_corrupt", "train.resume", "train.allow_config_change", "train.init_from",
    "train.force_unlock", "train.peak_tflops", "train.output_dir", "train.device", "train.max_nonfinite_steps",
    "data.manifest", "data.tokenizer", "data.num_workers", "data.prefetch_factor", "data.worker_start_method",
}
SAFE_SECTIONS_ON_RESUME = ("parallel.",)
# Starting from weights: only what does not change a tensor's shape or meaning may differ.
SAFE_ON_INIT = {
    "model.dropout", "model.attention_dropout", "model.activation_dropout", "model.init_std",
    "selection.temperature", "selection.temperature_min", "selection.temperature_decay", "selection.kl_weight",
    "selection.init_low", "selection.init_high", "selection.noise_scale",
}
_KNOWN_ERRORS = {cls.__name__: cls for cls in (ValueError, FileNotFoundError, ConfigError, CheckpointError,
                                               CheckpointCorruptError, OutputDirLockedError)}


def _structural(field: str) -> bool:
    """A field that changes the model's tensors or the task ids: no run can continue across it."""
    if field in SAFE_ON_INIT:
        return False
    return field.startswith(("model.", "selection.")) or field in ("synthetic.rules", "data.tasks", "data",
                                                                   "synthetic")


@dataclass
class StartPlan:
    resume: str | None = None
    init: tuple[str, str] | None = None  # ("checkpoint" | "import" | "upcycle", folder)


def on_rank0(fn, c: Coords) -> Any:
    """fn() on rank 0, its JSON result on every rank; a user error (ValueError, checkpoint or lock error) raised
    there is raised on every rank with the same message (so every rank stops, and rank 0 says why)."""
    out = None
    if c.rank == 0:
        try:
            out = {"ok": fn()}
        except tuple(_KNOWN_ERRORS.values()) as err:
            out = {"error": str(err), "type": type(err).__name__}
        except Exception as err:  # a bug: keep rank 0's traceback, stop the others
            bcast_json({"error": f"rank 0 failed: {type(err).__name__}: {err}", "type": "RuntimeError"}, c)
            raise
    out = bcast_json(out, c)
    if "error" in out:
        raise _KNOWN_ERRORS.get(out["type"], RuntimeError)(out["error"])
    return out["ok"]


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1} (one level of sections; field values stay whole)."""
    return {f"{prefix}{section}.{k}": v for section, fields in tree.items() if isinstance(fields, dict)
            for k, v in fields.items()}


def differences(saved: dict, now: dict, allowed: set[str], safe_prefixes: tuple[str, ...] = ()) -> list[str]:
    """'field: checkpoint X, now Y' for every field both configs record that differs and may not."""
    old, new = flatten(saved), flatten(now)
    out = []
    for key in sorted(set(old) & set(new)):
        if key in allowed or key.startswith(safe_prefixes) or _same(old[key], new[key]):
            continue
        out.append(f"{key}: checkpoint {old[key]!r}, now {new[key]!r}")
    for section in ("data", "synthetic"):  # a corpus run resumed as a synthetic one, or the other way round
        if bool(saved.get(section)) != bool(now.get(section)) and section in saved:
            out.append(f"{section}: checkpoint {'set' if saved.get(section) else 'unset'}, now "
                       f"{'set' if now.get(section) else 'unset'}")
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _read_config(folder: Path) -> dict:
    if (folder / "config.json").is_file():
        return json.loads((folder / "config.json").read_text())
    return yaml.safe_load((folder / "config.yaml").read_text()) or {}


def task_names(config: dict) -> list[str] | None:
    if config.get("synthetic"):
        return list(config["synthetic"].get("rules") or [])
    return list((config.get("data") or {}).get("tasks") or []) or None


def start_plan(cfg, ckpt: CheckpointManager, c: Coords, resume_from: str | None = None) -> StartPlan:
    """Decide (rank 0) and agree (every rank) what this run starts from; see the module docstring."""
    return StartPlan(**on_rank0(lambda: _plan(cfg, ckpt, resume_from), c))


def _plan(cfg, ckpt: CheckpointManager, resume_from: str | None) -> dict:
    t, now = cfg.train, cfg.to_dict()
    if resume_from is not None:  # a launcher's restart (Ray): the same run, always resumed, verified
        path = require_verified(resume_from)
    else:
        existing = ckpt.list_checkpoints()
        if t.resume == "never" and existing:
            raise ValueError(f"train.resume=never but {ckpt.root} already holds checkpoints (newest: step "
                             f"{existing[-1].step}): use a new train.output_dir, or train.resume=auto to continue")
        path = ckpt.latest_path() if t.resume != "never" else None
        if path is None and t.resume == "must":
            raise ValueError(f"train.resume=must but there is no checkpoint under {ckpt.root}: check "
                             "train.output_dir, or use train.resume=auto to start fresh")
    if path is not None:
        saved = _read_config(path)
        diffs = differences(saved, now, SAFE_ON_RESUME | set(t.allow_config_change), SAFE_SECTIONS_ON_RESUME)
        if diffs:
            fields = [d.split(":")[0] for d in diffs]
            structural = [f for f in fields if _structural(f)]
            accept = ("" if structural else
                      f"; or accept the change with --train.allow_config_change [{','.join(fields)}]")
            raise ValueError(
                f"checkpoint {path} was written with another config: {'; '.join(diffs)}. Resume with the "
                f"checkpoint's values; or start a new run in a new train.output_dir"
                + ("" if structural else f" (--train.init_from {path} starts it from these weights)") + accept)
        step = int(json.loads((path / "meta.json").read_text())["step"])
        if step > t.steps:
            raise ValueError(f"checkpoint {path} is at step {step}, past train.steps={t.steps}: nothing to train. "
                             f"Raise --train.steps above {step} to continue it, or use a new train.output_dir")
        if t.init_from:
            print(f"train.init_from ignored: {ckpt.root} already holds this run's checkpoints (step {step}); "
                  "resuming them", flush=True)
        if step == t.steps:
            print(f"checkpoint {path} is already at train.steps={step}: only the final evaluation runs "
                  "(raise --train.steps to train further)", flush=True)
        return {"resume": str(path)}
    if t.init_from:
        return {"init": list(_resolve_init(t.init_from, now, set(t.allow_config_change)))}
    return {}


def _resolve_init(source: str, now: dict, allowed: set[str]) -> tuple[str, str]:
    """(kind, folder) of verified weights to start from, their config checked against this run's."""
    p = Path(source)
    if not p.exists():
        raise FileNotFoundError(f"train.init_from={source}: no such checkpoint or import-hf directory")
    if (p / "model.safetensors").is_file():
        kind, folder = "import", require_verified(p)
    elif is_step_folder(p):
        kind, folder = "checkpoint", require_verified(p)
    else:  # a checkpoint root, or a run's output_dir holding one
        root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        kind, folder = "checkpoint", CheckpointManager(root, on_corrupt="raise").latest_path()
        if folder is None:
            raise FileNotFoundError(f"train.init_from={source}: no checkpoint under it (expected step_* folders, a "
                                    "step folder, or an `hs-scale import-hf` output directory)")
    saved = _read_config(folder)
    upcycle = kind == "checkpoint" and _upcycles(saved, now)
    if upcycle:  # dense weights into a selection pool: every selection field is new, the model's must agree
        kind = "upcycle"
        heads, pool = now["model"]["num_heads"], now["selection"]["pool_heads"]
        if pool % heads:
            raise ValueError(f"train.init_from={folder} holds a dense model (selection off) and this run selects "
                             f"heads: upcycling repeats each of its {heads} heads H'/H times, so "
                             f"selection.pool_heads={pool} must be a multiple of {heads} (e.g. {2 * heads})")
    shapes = {"model": saved.get("model") or {}, "selection": {} if upcycle else saved.get("selection") or {}}
    diffs = differences(shapes, {"model": now["model"], "selection": {} if upcycle else now["selection"]},
                        SAFE_ON_INIT | allowed)
    theirs, ours = task_names(saved), task_names(now)
    if theirs and ours and theirs != ours:
        diffs.append(f"tasks (in task-id order): weights {theirs}, now {ours}")
    if diffs:
        raise ValueError(f"train.init_from={folder} holds weights of another model: {'; '.join(diffs)}. Use the "
                         "same model and selection settings (e.g. --config on its config file)")
    return kind, str(folder)


def _upcycles(saved: dict, now: dict) -> bool:
    """init_from a dense encoder-decoder checkpoint (selection off) into a run that selects heads."""
    dense = not (saved.get("selection") or {}).get("enabled", True)
    return dense and now["selection"]["enabled"] and now["model"].get("arch") in ("s2t", "text")


def load_init_weights(kind: str, folder: str, model, groups=None, cfg=None, num_tasks: int = 0) -> None:
    """Copy verified weights (checked by start_plan) into `model` (any layout); optimizer state is not touched.

    kind "upcycle" (a dense checkpoint into this run's selection pool, `cfg` and `num_tasks` needed): each dense
    head becomes r = H'/H identical candidates with phi favouring the first (hs_scale.models.upcycle), so step 0
    computes the dense model's function for every task and training lets the copies specialise per task.
    """
    from hs_scale.checkpoint import state
    from hs_scale.checkpoint.ranks import coords, tp_context

    c = coords(groups)
    if kind == "checkpoint":
        CheckpointManager(Path(folder).parent).load_weights(folder, model, groups, verify=False)
        return
    if kind == "upcycle":
        from dataclasses import replace

        from hs_scale.checkpoint.manager import load_full_model_state
        from hs_scale.models import build_model
        from hs_scale.models.upcycle import upcycle_state

        dense_like = build_model(cfg.model, replace(cfg.selection, enabled=False), num_tasks)
        _, dense = load_full_model_state(folder, like=dense_like, verify=False)
        _, pooled = upcycle_state(cfg.model, cfg.selection, dense, num_tasks)
        state.load_full(model, pooled, tp_context(c, model))
        return
    from safetensors.torch import load_file

    state.load_full(model, load_file(str(Path(folder) / "model.safetensors")), tp_context(c, model))
