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
are removed by the next save or by `clean_stale()` at the next start (the run holds the output dir's lock, so
nobody else is writing them). `latest` is authoritative: a complete folder newer than it (a crash between
rename and pointer update) is ignored, and removed by the next save. A save that fails (disk full, I/O error
on any rank) removes its tmp folder on every rank's agreement and raises CheckpointSaveError: one line with
what failed, where, the space needed and free, and the checkpoint that is still intact.

Retention counts only *verified* checkpoints (written by this process, or checksummed): the newest
`keep_last` verified ones are kept, older ones deleted. A checkpoint that fails verification is never kept
in place of a good one: pruning moves it aside to `step_X.corrupt-<nonce>/` (out of every listing, kept for
inspection) instead of counting it.

Loading: every read path verifies the same way (`verify_checkpoint` / `require_verified`: train resume,
init_from, evaluate, averaging, export, Ray restore); `load(path)` verifies unless told not to.
For `load_latest`, rank 0 verifies the candidate (COMPLETE present and parseable, every file's size and checksum,
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
import errno
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
from torch.distributed.checkpoint import CheckpointException, FileSystemWriter

from hs_scale.checkpoint import safe_io, state
from hs_scale.checkpoint.ranks import Coords, any_rank, barrier, bcast_json, coords, tp_context
from hs_scale.checkpoint.safe_io import SafeFileSystemReader, read_dcp_metadata

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{9})$")
ON_CORRUPT = ("fallback", "raise")


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or written; the message names the folder, the reason and the fix."""


class CheckpointCorruptError(CheckpointError):
    """The checkpoint to load is incomplete or corrupt (and the policy says stop), or none is usable."""


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed (disk full, I/O error); its partial folder was removed."""


def verify_checkpoint(path: str | os.PathLike, mode: str = "sha256") -> str | None:
    """None if the checkpoint folder `path` is complete and intact, else the reason it is not.

    mode "sha256" checksums every file listed in COMPLETE; "size" only compares sizes (fast for huge ones).
    """
    path = Path(path)
    if not path.is_dir():
        return "not a folder" if path.exists() else "does not exist"
    try:
        marker = json.loads((path / "COMPLETE").read_text())
        files = marker["files"]
    except FileNotFoundError:
        return "no COMPLETE marker (the save did not finish, or this is not a checkpoint folder)"
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable COMPLETE marker ({e})"
    for rel, want in sorted(files.items()):
        f = path / rel
        if not f.is_file():
            return f"file {rel} is missing"
        if f.stat().st_size != want["size"]:
            return f"file {rel} has {f.stat().st_size} bytes, expected {want['size']} (truncated or rewritten)"
        if mode == "sha256" and safe_io.sha256_file(f) != want["sha256"]:
            return f"file {rel} fails its checksum (corrupt)"
    if not (path / ".metadata").exists():  # a weights-only folder (import-hf): COMPLETE covers everything
        return None
    try:
        json.loads((path / "meta.json").read_text())
        metadata = read_dcp_metadata(path)
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot be loaded"
        return f"unreadable metadata ({type(e).__name__}: {e})"
    needed = {info.relative_path for info in metadata.storage_data.values()}
    if needed - set(files):
        return f"DCP metadata refers to files not covered by COMPLETE: {sorted(needed - set(files))}"
    return None


def require_verified(path: str | os.PathLike, mode: str = "sha256") -> Path:
    """`path` if it verifies, else CheckpointCorruptError naming the folder, the reason and the override."""
    reason = verify_checkpoint(path, mode)
    if reason is not None:
        raise CheckpointCorruptError(
            f"checkpoint {path} is incomplete or corrupt: {reason}; refusing to load it (use another checkpoint, "
            "or --no-verify to load it anyway at your own risk)"
        )
    return Path(path)


def is_step_folder(path: str | os.PathLike) -> bool:
    """A single checkpoint (as opposed to a root holding step_* folders and `latest`)."""
    path = Path(path)
    return bool(_STEP_DIR.match(path.name)) or (path / "COMPLETE").exists() or (path / ".metadata").exists()


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
        self._verified: dict[str, str | None] = {}  # folder name -> None (good) or the reason it is bad

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
        """None if the checkpoint at `path` is complete and intact, else the reason it is not (cached per run)."""
        reason = verify_checkpoint(path, self.verify_mode)
        self._verified[Path(path).name] = reason
        return reason

    def clean_stale(self) -> list[Path]:
        """Remove leftovers of killed saves (`*.tmp-*`, `*.old-*`); only safe while holding the run's lock."""
        removed = []
        if self.root.is_dir():
            for p in self.root.iterdir():
                if ".tmp-" in p.name or ".old-" in p.name:
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                    removed.append(p)
        return removed

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
        """Write checkpoint `step` (every rank calls this); returns its final folder.

        Raises CheckpointSaveError on every rank if any rank's write failed (the partial folder is removed).
        """
        c = coords(groups)
        config_text = json.dumps(config or {}, indent=1, sort_keys=True, default=_json_refusal)  # fail before writing
        nonce = bcast_json(secrets.token_hex(4), c)
        final = self.path_of(step)
        tmp = final.with_name(f"{final.name}.tmp-{nonce}")
        tp = tp_context(c, model)
        entries = state.model_entries(model, tp)
        if optimizer is not None:
            entries += state.optimizer_entries(optimizer, model, tp)

        def write_rank_files() -> None:
            writer = FileSystemWriter(tmp, single_file_per_rank=True, sync_files=True, thread_count=1)
            with _quiet_single_process():
                dcp.save(state.save_dict(entries, tp), storage_writer=writer, no_dist=c.world == 1)
            where = {"rank": c.rank, "tp_rank": c.tp_rank, "pp_rank": c.pp_rank, "dp_rank": c.dp_rank, **c.layout()}
            safe_io.save_tree(
                tmp / f"rank_{c.rank:05d}", {"coords": where, "extra": extra_per_rank, "rng": state.rng_state()}
            )
            if c.rank == 0:
                self._write_trainer_files(tmp, step, c, optimizer, scheduler, config_text, metrics)

        try:
            _on_every_rank(c, lambda: tmp.mkdir(parents=True) if c.rank == 0 else None)
            _on_every_rank(c, write_rank_files)  # every rank's files are on disk, or every rank raises
            _on_every_rank(c, lambda: self._finalize(step, tmp, final, nonce) if c.rank == 0 else None)
        except (Exception, CheckpointException) as err:  # DCP's CheckpointException is a BaseException
            if c.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointSaveError(self._save_failure(step, tmp, entries, err)) from err
        barrier(c)  # nobody reads or prunes before the pointer moved
        return final

    def _write_trainer_files(self, tmp, step, c, optimizer, scheduler, config_text, metrics) -> None:
        groups_hp = None
        if optimizer is not None:
            groups_hp = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
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

    def _save_failure(self, step: int, tmp: Path, entries, err: BaseException) -> str:
        """One line: what failed, where, space needed vs free, and which checkpoint is still intact."""
        previous = self._pointer()
        needed = None
        if previous and (self.root / previous / "COMPLETE").is_file():  # same run: the last one's size
            try:
                files = json.loads((self.root / previous / "COMPLETE").read_text())["files"]
                needed = sum(f["size"] for f in files.values())
            except (ValueError, KeyError, TypeError):
                needed = None
        if needed is None:  # this rank's tensors: a lower bound
            needed = sum(e.local.numel() * e.local.element_size() for group in entries for es in group for e in es)
        try:
            free = shutil.disk_usage(self.root if self.root.exists() else self.root.parent).free
        except OSError:
            free = None
        reason = _first_line(err)
        if _is_disk_full(err) or (free is not None and free < needed):
            reason = f"no space left on the device ({reason})" if "space" not in reason.lower() else reason
        space = f"needs about {needed / 2**20:.1f} MiB" + (f", {free / 2**20:.1f} MiB free" if free is not None else "")
        intact = f"the last intact checkpoint is {self.root / previous}" if previous else "no earlier checkpoint exists"
        return (f"saving checkpoint step {step} failed: {reason}; writing {tmp} ({space}); the partial folder was "
                f"removed and {intact} (free space, then rerun: it resumes from there)")

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
        self._verified[final.name] = None  # we just checksummed what we wrote
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._prune(step)

    def _prune(self, step: int) -> None:
        """Keep the newest `keep_last` verified checkpoints <= step (module docstring: retention)."""
        dirs = self._step_dirs()
        good = []
        for s, p in reversed(dirs):
            if s > step:  # newer than `latest`: an abandoned timeline (latest is authoritative)
                shutil.rmtree(p, ignore_errors=True)
                continue
            if len(good) >= self.keep_last:  # older than the kept ones: no need to verify what is deleted
                shutil.rmtree(p, ignore_errors=True)
                continue
            reason = self._verified[p.name] if p.name in self._verified else self.verify(p)
            if reason is None:
                good.append(p)
                continue
            aside = p.with_name(f"{p.name}.corrupt-{secrets.token_hex(4)}")
            warnings.warn(f"checkpoint {p} is incomplete or corrupt ({reason}); moved aside to {aside.name}",
                          stacklevel=3)
            os.rename(p, aside)
        self.clean_stale()

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
        return self.load(choice["path"], model, optimizer, scheduler, groups, verify=False)

    def _verify_everywhere(self, path: Path, c: Coords) -> None:
        reason = bcast_json(self.verify(path) if c.rank == 0 else None, c)
        if reason is not None:
            raise CheckpointCorruptError(
                f"checkpoint {path} is incomplete or corrupt: {reason}; refusing to load it (use another checkpoint, "
                "or --no-verify to load it anyway at your own risk)")

    def choose(self, groups=None) -> Path | None:
        """The checkpoint `load_latest` would restore (verified, corruption policy applied), on every rank."""
        c = coords(groups)
        choice = bcast_json(self._choose() if c.rank == 0 else None, c)
        if "error" in choice:
            raise CheckpointCorruptError(choice["error"] if c.rank == 0 else f"(from rank 0) {choice['error']}")
        return Path(choice["path"]) if "path" in choice else None

    def load_weights(self, path: str | os.PathLike, model: nn.Module, groups=None, verify: bool = True) -> dict:
        """Only the model tensors of the checkpoint at `path` (any layout), e.g. to start a new run from them.

        Returns the checkpoint's meta.json (step, layout, metrics).
        """
        c, path = coords(groups), Path(path)
        if verify:
            self._verify_everywhere(path, c)
        loader = state.Loader(read_dcp_metadata(path), tp_context(c, model))
        state.want_model(loader, model)
        with _quiet_single_process():
            dcp.load(loader.targets, storage_reader=SafeFileSystemReader(path), no_dist=c.world == 1)
        loader.apply()
        return json.loads((path / "meta.json").read_text())

    def load(self, path: str | os.PathLike, model: nn.Module, optimizer=None, scheduler=None, groups=None,
             verify: bool = True):
        """Restore the checkpoint at `path` (verified by rank 0 first unless verify=False); returns (step, extra)."""
        c, path = coords(groups), Path(path)
        if verify:
            self._verify_everywhere(path, c)
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


def _on_every_rank(c: Coords, fn) -> None:
    """Run `fn` on this rank, then agree: if it failed on any rank, every rank raises (nobody waits at a barrier
    for a rank that already gave up)."""
    error = None
    try:
        fn()
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - re-raised below, after the other ranks know
        error = err
    if any_rank(error is not None, c):
        raise error if error is not None else CheckpointSaveError("another rank failed to write its part")


def _root_cause(err: BaseException) -> BaseException:
    """The exception a rank hit inside DCP (CheckpointException wraps one (exception, traceback) per rank)."""
    if isinstance(err, CheckpointException) and err.failures:
        wrapped = next(iter(err.failures.values()))
        return wrapped[0] if isinstance(wrapped, tuple) else wrapped
    return err


def _first_line(err: BaseException) -> str:
    err = _root_cause(err)
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _is_disk_full(err: BaseException | None) -> bool:
    """ENOSPC anywhere in the cause chain, or the messages torch's zip writer gives for a short write."""
    err = _root_cause(err) if err is not None else None
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(err)
        if "No space left" in text or "unexpected pos" in text or "file write failed" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


def _json_refusal(obj: Any) -> Any:
    raise TypeError(f"config/metrics value of type {type(obj).__name__} is not JSON: pass plain values")


def load_full_model_state(
    path: str | os.PathLike, like: nn.Module | None = None, verify: bool = True
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, full single-device state dict) of a checkpoint folder or of a root's latest, in one process.

    Global tensors are consolidated from whatever layout saved them (TP shards joined, selector layers
    stacked). With `like` (a single-device model), tied names missing from the checkpoint are filled from
    their alias and padded dimensions (vocabulary) are cut/zero-padded to `like`'s shapes, so
    `like.load_state_dict(state)` works. A step folder is verified first (CheckpointCorruptError naming it and
    the reason) unless verify=False; a root resolves to its latest checkpoint that verifies.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if is_step_folder(path):
        if verify:
            require_verified(path)
    else:  # a root: its latest usable checkpoint
        resolved = CheckpointManager(path).latest_path()
        if resolved is None:
            raise FileNotFoundError(f"no checkpoint under {path} (expected step_* folders and a `latest` file)")
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
