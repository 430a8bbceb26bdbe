"""CheckpointManager: atomic, verified, reshardable checkpoints of a TP x PP x DP run (torch DCP underneath).

    ckpt = CheckpointManager(run_dir / "checkpoints", keep_last=3, on_corrupt="fallback")
    resumed = ckpt.load_latest(model, optimizer, scheduler, groups)      # None: fresh start
    step, extra = resumed or (0, None)
    ...
    ckpt.save(step, model, optimizer, scheduler, extra_per_rank={"loader": loader.state_dict()}, config=cfg)
    config, state = load_full_model_state(run_dir / "checkpoints", like=dense_model)   # one process: eval/export

One checkpoint is a folder `step_<9 digits>/`:
    .metadata, __<r>_0.distcp   DCP: model + optimizer state, layout-free keys (state.py), read by any layout
    trainer.json[.safetensors]  scheduler state, optimizer hyper-parameters per param group (rank 0)
    rank_<r>.json[.safetensors] per global rank: its coordinates (tp, pp, dp), `extra_per_rank` (data-loader
                                state...) and RNG states (python, numpy, torch, cuda, megatron tracker)
    config.json, meta.json      run config; step, layout, metrics, versions
    COMPLETE                    size + sha256 of every file above: written last, inside the folder
and `latest` (a text file naming the folder) points at the newest complete one.

Atomic: every rank writes into `step_X.tmp-<nonce>/`; after a barrier rank 0 checksums the files, writes
COMPLETE, renames the folder to `step_X/`, then replaces `latest` (os.replace), then prunes to the last
`keep_last`. A crash at any point leaves `latest` on the previous complete checkpoint; leftovers (.tmp-*)
are removed by the next save. `latest` is authoritative: a complete folder newer than it (a crash between
rename and pointer update) is ignored, and removed by the next save.

Loading: rank 0 verifies the candidate (COMPLETE present and parseable, every file's size and checksum,
DCP metadata readable by the allow-listed unpickler) and broadcasts its choice. A bad candidate either falls
back to the previous complete checkpoint with a warning (on_corrupt="fallback") or stops with
CheckpointCorruptError naming the folder and the reason (on_corrupt="raise"). Nothing is ever unpickled
except DCP metadata through an allow-list (safe_io.py); tensors are read with torch.load(weights_only=True).

Per-rank state is restored only where it still means the same thing: `extra_per_rank` goes back to the rank
with the same (tp, pp, dp) coordinates when the layout is unchanged, else to a rank with the same dp rank
when the data-parallel size is unchanged (the data plan depends only on it), else None (with a warning).
RNG states are restored only when the layout is unchanged.

NOTE: under multi-process, every rank must call save/load (DCP and the barriers are collectives). A rank
that raises mid-save leaves the others waiting at the next barrier until the process-group timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter

from hs_scale.checkpoint import safe_io, state
from hs_scale.checkpoint.ranks import Coords, barrier, bcast_json, coords, tp_context
from hs_scale.checkpoint.safe_io import SafeFileSystemReader, read_dcp_metadata

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{9})$")
ON_CORRUPT = ("fallback", "raise")


class CheckpointCorruptError(RuntimeError):
    """The checkpoint to resume from is incomplete or corrupt (and the policy says stop), or none is usable."""


@dataclass
class CheckpointInfo:
    step: int
    path: Path
    complete: bool  # a COMPLETE marker is present (not verified: see CheckpointManager.verify)
    latest: bool


class CheckpointManager:
    """Saves and restores training state under `root` (see module docstring).

    keep_last: complete checkpoints kept (older ones are deleted after a new one is complete).
    on_corrupt: "fallback" (warn, use the previous complete checkpoint) or "raise" (CheckpointCorruptError).
    verify: "sha256" (checksum every file before loading) or "size" (sizes only: fast for huge checkpoints).
    """

    def __init__(
        self, root: str | os.PathLike, keep_last: int = 3, on_corrupt: str = "fallback", verify: str = "sha256"
    ):
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last} must be >= 1")
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt={on_corrupt!r}: use one of {ON_CORRUPT}")
        if verify not in ("sha256", "size"):
            raise ValueError(f"verify={verify!r}: use 'sha256' or 'size'")
        self.root, self.keep_last, self.on_corrupt, self.verify_mode = Path(root), keep_last, on_corrupt, verify

    # ----------------------------------------------------------------------------------------------- listing
    def path_of(self, step: int) -> Path:
        return self.root / f"step_{step:09d}"

    def _step_dirs(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
        return sorted(found)

    def _pointer(self) -> str | None:
        try:
            return (self.root / "latest").read_text().strip()
        except (FileNotFoundError, UnicodeDecodeError):
            return None

    def list_checkpoints(self) -> list[CheckpointInfo]:
        """Every step folder, oldest first (cheap: markers are not verified)."""
        pointer = self._pointer()
        return [CheckpointInfo(s, p, (p / "COMPLETE").is_file(), p.name == pointer) for s, p in self._step_dirs()]

    def verify(self, path: str | os.PathLike) -> str | None:
        """None if the checkpoint at `path` is complete and intact, else the reason it is not."""
        path = Path(path)
        try:
            marker = json.loads((path / "COMPLETE").read_text())
            files = marker["files"]
        except FileNotFoundError:
            return "no COMPLETE marker (the save did not finish)"
        except (ValueError, KeyError, TypeError) as e:
            return f"unreadable COMPLETE marker ({e})"
        for rel, want in sorted(files.items()):
            f = path / rel
            if not f.is_file():
                return f"file {rel} is missing"
            if f.stat().st_size != want["size"]:
                return f"file {rel} has {f.stat().st_size} bytes, expected {want['size']} (truncated or rewritten)"
            if self.verify_mode == "sha256" and safe_io.sha256_file(f) != want["sha256"]:
                return f"file {rel} fails its checksum (corrupt)"
        try:
            json.loads((path / "meta.json").read_text())
            metadata = read_dcp_metadata(path)
        except Exception as e:  # noqa: BLE001 - any failure here means "cannot be loaded"
            return f"unreadable metadata ({type(e).__name__}: {e})"
        needed = {info.relative_path for info in metadata.storage_data.values()}
        if needed - set(files):
            return f"DCP metadata refers to files not covered by COMPLETE: {sorted(needed - set(files))}"
        return None

    # ----------------------------------------------------------------------------------------------- save
    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        extra_per_rank: dict | None = None,
        config: dict | None = None,
        groups=None,
        metrics: dict | None = None,
    ) -> Path:
        """Write checkpoint `step` (every rank calls this); returns its final folder."""
        c = coords(groups)
        config_text = json.dumps(config or {}, indent=1, sort_keys=True, default=_json_refusal)  # fail before writing
        nonce = bcast_json(secrets.token_hex(4), c)
        final = self.path_of(step)
        tmp = final.with_name(f"{final.name}.tmp-{nonce}")
        if c.rank == 0:
            tmp.mkdir(parents=True)
        barrier(c)

        tp = tp_context(c, model)
        entries = state.model_entries(model, tp)
        if optimizer is not None:
            entries += state.optimizer_entries(optimizer, model, tp)
        writer = FileSystemWriter(tmp, single_file_per_rank=True, sync_files=True, thread_count=1)
        with _quiet_single_process():
            dcp.save(state.save_dict(entries, tp), storage_writer=writer, no_dist=c.world == 1)

        where = {"rank": c.rank, "tp_rank": c.tp_rank, "pp_rank": c.pp_rank, "dp_rank": c.dp_rank, **c.layout()}
        safe_io.save_tree(
            tmp / f"rank_{c.rank:05d}", {"coords": where, "extra": extra_per_rank, "rng": state.rng_state()}
        )
        if c.rank == 0:
            groups_hp = (
                [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] if optimizer else None
            )
            trainer = {
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "optimizer_groups": groups_hp,
            }
            safe_io.save_tree(tmp / "trainer", trainer)
            safe_io.write_bytes(tmp / "config.json", config_text.encode())
            meta = {
                "format": FORMAT_VERSION,
                "step": step,
                "layout": c.layout(),
                "time": time.time(),
                "torch": torch.__version__,
                "metrics": metrics or {},
            }
            safe_io.write_bytes(tmp / "meta.json", json.dumps(meta, indent=1, default=_json_refusal).encode())
        barrier(c)  # every rank's files are on disk
        if c.rank == 0:
            self._finalize(step, tmp, final, nonce)
        barrier(c)  # nobody reads or prunes before the pointer moved
        return final

    def _finalize(self, step: int, tmp: Path, final: Path, nonce: str) -> None:
        files = {}
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                rel = f.relative_to(tmp).as_posix()
                files[rel] = {"size": f.stat().st_size, "sha256": safe_io.sha256_file(f)}
        safe_io.write_json(tmp / "COMPLETE", {"step": step, "files": files})
        safe_io.fsync_dir(tmp)
        old = None
        if final.exists():  # a folder of an abandoned timeline (we resumed from an older step): replace it
            old = final.with_name(f"{final.name}.old-{nonce}")
            os.rename(final, old)
        os.rename(tmp, final)
        safe_io.fsync_dir(self.root)
        safe_io.replace_text(self.root / "latest", final.name + "\n")
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._prune(step)

    def _prune(self, step: int) -> None:
        dirs = self._step_dirs()
        complete = [s for s, p in dirs if s <= step and (p / "COMPLETE").is_file()]
        oldest_kept = complete[-self.keep_last] if len(complete) >= self.keep_last else -1
        for s, p in dirs:
            # Older than the K kept ones, or newer than `latest` (an abandoned timeline: latest is authoritative).
            if s < oldest_kept or s > step:
                shutil.rmtree(p, ignore_errors=True)
        for p in self.root.iterdir():
            if ".tmp-" in p.name or ".old-" in p.name:  # leftovers of crashed saves
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    # ----------------------------------------------------------------------------------------------- load
    def latest_path(self) -> Path | None:
        """The checkpoint to resume from under the corruption policy (one process; see module docstring)."""
        choice = self._choose()
        if "error" in choice:
            raise CheckpointCorruptError(choice["error"])
        return Path(choice["path"]) if "path" in choice else None

    def _choose(self) -> dict:
        dirs = self._step_dirs()
        pointer = self._pointer()
        candidates: list[tuple[Path, str | None]] = []  # (folder, reason it is unusable before verifying)
        if pointer is None:
            if not dirs:
                return {}
            warnings.warn(f"{self.root}: no readable `latest` pointer; trying step folders newest first", stacklevel=3)
            candidates = [(p, None) for _, p in reversed(dirs)]
        else:
            m = _STEP_DIR.match(pointer)
            at = int(m.group(1)) if m else None
            if at is None or not (self.root / pointer).is_dir():
                candidates.append(
                    (self.root / pointer, f"`latest` names {pointer!r}, which is not a checkpoint folder")
                )
                at = max((s for s, _ in dirs), default=-1) if at is None else at
            candidates += [(p, None) for s, p in reversed(dirs) if s <= at]  # newer than `latest`: abandoned
        problems = []
        for i, (path, reason) in enumerate(candidates):
            reason = reason or self.verify(path)
            if reason is None:
                return {"path": str(path)}
            problems.append(f"{path}: {reason}")
            later = next((str(p) for p, r in candidates[i + 1 :] if r is None), None)
            if self.on_corrupt == "raise":
                hint = f"the previous checkpoint is {later}; " if later else ""
                return {
                    "error": f"checkpoint {path} is incomplete or corrupt: {reason}. To resume, {hint}delete or "
                    f"move the bad folder, or set on_corrupt='fallback'"
                }
            warnings.warn(
                f"checkpoint {path} is incomplete or corrupt ({reason}); "
                f"{'falling back to ' + later if later else 'no older checkpoint left'}",
                stacklevel=3,
            )
        return {"error": f"no usable checkpoint under {self.root}:\n  " + "\n  ".join(problems)}

    def load_latest(self, model: nn.Module, optimizer=None, scheduler=None, groups=None):
        """Restore the newest usable checkpoint; returns (step, this rank's extra_per_rank) or None if none exists."""
        c = coords(groups)
        choice = bcast_json(self._choose() if c.rank == 0 else None, c)
        if "error" in choice:
            raise CheckpointCorruptError(choice["error"] if c.rank == 0 else f"(from rank 0) {choice['error']}")
        if "path" not in choice:
            return None
        return self.load(choice["path"], model, optimizer, scheduler, groups)

    def load(self, path: str | os.PathLike, model: nn.Module, optimizer=None, scheduler=None, groups=None):
        """Restore the checkpoint at `path` (not verified: load_latest does that); returns (step, extra)."""
        c, path = coords(groups), Path(path)
        tp = tp_context(c, model)
        loader = state.Loader(read_dcp_metadata(path), tp)
        state.want_model(loader, model)
        opt_state = state.want_optimizer(loader, optimizer, model) if optimizer is not None else None
        with _quiet_single_process():
            dcp.load(loader.targets, storage_reader=SafeFileSystemReader(path), no_dist=c.world == 1)
        loader.apply()
        trainer = safe_io.load_tree(path / "trainer")
        if optimizer is not None:
            _load_optimizer(optimizer, opt_state, trainer["optimizer_groups"], path)
        if scheduler is not None and trainer["scheduler"] is not None:
            scheduler.load_state_dict(trainer["scheduler"])
        meta = json.loads((path / "meta.json").read_text())
        return meta["step"], self._restore_rank_state(path, c, meta["layout"])

    def _restore_rank_state(self, path: Path, c: Coords, saved_layout: dict) -> dict | None:
        same_layout = saved_layout == c.layout()
        if same_layout:
            tree = safe_io.load_tree(path / f"rank_{c.rank:05d}")
            state.set_rng_state(tree["rng"])
            return tree["extra"]
        if saved_layout["dp"] == c.dp_size:  # data plan unchanged: any rank of the same dp rank has its state
            for f in sorted(path.glob("rank_*.json")):
                tree = safe_io.load_tree(f.with_suffix(""))
                if tree["coords"]["dp_rank"] == c.dp_rank:
                    return tree["extra"]
        warnings.warn(
            f"{path} was saved with data_parallel={saved_layout['dp']}, this run has {c.dp_size}: "
            "per-rank state (data-loader position) is not restored",
            stacklevel=3,
        )
        return None


def _load_optimizer(optimizer, opt_state, saved_groups, path: Path) -> None:
    if saved_groups is None:
        raise ValueError(f"{path} holds no optimizer state (saved without an optimizer)")
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"{path} has {len(saved_groups)} optimizer param groups, this optimizer has "
            f"{len(optimizer.param_groups)}: build the optimizer the same way as the saving run"
        )
    groups, index = [], 0
    for current, saved in zip(optimizer.param_groups, saved_groups, strict=True):
        hp = {k: tuple(v) if isinstance(current.get(k), tuple) else v for k, v in saved.items()}
        groups.append({**hp, "params": list(range(index, index + len(current["params"])))})
        index += len(current["params"])
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every single-process save/load that it assumes one process: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _json_refusal(obj: Any) -> Any:
    raise TypeError(f"config/metrics value of type {type(obj).__name__} is not JSON: pass plain values")


def load_full_model_state(
    path: str | os.PathLike, like: nn.Module | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, full single-device state dict) of a checkpoint folder or of a root's latest, in one process.

    Global tensors are consolidated from whatever layout saved them (TP shards joined, selector layers
    stacked). With `like` (a single-device model), tied names missing from the checkpoint are filled from
    their alias and padded dimensions (vocabulary) are cut/zero-padded to `like`'s shapes, so
    `like.load_state_dict(state)` works.
    """
    path = Path(path)
    if not (path / ".metadata").is_file():  # a root: its latest usable checkpoint
        resolved = CheckpointManager(path).latest_path()
        if resolved is None:
            raise FileNotFoundError(f"no checkpoint under {path}")
        path = resolved
    targets, stacks = state.consolidate(read_dcp_metadata(path))
    with _quiet_single_process():
        dcp.load(targets, storage_reader=SafeFileSystemReader(path), no_dist=True)
    full = state.stack_layers(targets, stacks, "model.")
    config = json.loads((path / "config.json").read_text())
    if like is not None:
        full = _fit(full, like)
    return config, full


def _fit(full: dict[str, torch.Tensor], like: nn.Module) -> dict[str, torch.Tensor]:
    want = {k: v for k, v in like.state_dict().items() if isinstance(v, torch.Tensor)}
    for names in state._aliases(like).values():
        have = next((n for n in names if n in full), None)
        for n in names:
            if n not in full and have is not None:
                full[n] = full[have]
    out = {}
    for k, v in full.items():
        if k in want and want[k].shape != v.shape and want[k].dim() == v.dim():
            fitted = torch.zeros_like(want[k], dtype=v.dtype)
            region = tuple(slice(0, min(a, b)) for a, b in zip(want[k].shape, v.shape, strict=True))
            fitted[region] = v[region]
            v = fitted
        out[k] = v
    return out
