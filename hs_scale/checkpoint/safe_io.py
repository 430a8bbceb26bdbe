"""Files of a checkpoint that are read without ever running pickled code, and durable (fsync'd) writes.

* DCP's `.metadata` is a pickle written by torch. `SafeFileSystemReader` reads it with `_MetadataUnpickler`,
  which only constructs an allow-list of DCP's metadata dataclasses, torch.Size, dtypes and paths; any other
  global (e.g. `os.system` in a tampered file) raises `UnsafeCheckpointError` before it is called. The tensor
  files are read by torch's FileSystemReader with `torch.load(weights_only=True)`; byte items (which DCP
  unpickles with weights_only=False) are refused at metadata time, and our state dicts never contain them.
* Everything else (per-rank loader/RNG state, scheduler, optimizer hyper-parameters, config) is JSON, with
  tensors in a sibling safetensors file: `save_tree` / `load_tree`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file asks for something a checkpoint never needs (a pickled global outside the allow-list)."""


_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # maps a layout name to torch.strided & co.
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_MODULES and not name.startswith("__"):
            obj = getattr(__import__(module, fromlist=[name]), name, None)
            # Only DCP's plain record types (dataclasses / enums), never its functions.
            if isinstance(obj, type):
                return obj
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        if (module, name) in _ALLOWED:
            return getattr(__import__(module, fromlist=[name]), name)
        raise UnsafeCheckpointError(f"checkpoint metadata references {module}.{name}, which is not allowed")


def read_dcp_metadata(path: str | os.PathLike) -> Metadata:
    """DCP metadata of the checkpoint folder `path`, unpickled with the allow-list (see module docstring)."""
    with open(Path(path) / ".metadata", "rb") as f:
        metadata = _MetadataUnpickler(f).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{path}/.metadata does not hold DCP Metadata (got {type(metadata).__name__})")
    byte_items = [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
    if byte_items:
        # DCP would torch.load(weights_only=False) these: a checkpoint of ours never has them.
        raise UnsafeCheckpointError(f"{path} holds pickled (non-tensor) items {byte_items[:5]}; refusing to load")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata is read with the allow-listed unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_dcp_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ---------------------------------------------------------------------------------------------------------------
# Durable small files


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename / file creation inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def replace_text(path: str | os.PathLike, text: str) -> None:
    """Atomically replace a small text file: a reader sees the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_bytes(tmp, text.encode())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# JSON + safetensors trees (dicts, lists, tuples, scalars, strings, bytes, tensors, numpy arrays)


def _encode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous().clone()  # safetensors refuses shared storage
        return {"__tensor__": name}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        return {
            "__items__": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")] for k, v in obj.items()]
        }
    if isinstance(obj, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(obj)).decode()}
    if isinstance(obj, pathlib.PurePath):
        return str(obj)
    if type(obj).__module__ == "numpy":
        import numpy as np

        if isinstance(obj, np.ndarray):
            return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
        return obj.item()  # numpy scalar
    raise TypeError(
        f"checkpoint state at {where} has type {type(obj).__name__}, which is not JSON/tensor data; store plain "
        "values (dict/list/tuple/int/float/str/bytes/tensor/ndarray) so loading never needs pickle"
    )


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    if "__bytes__" in obj:
        return base64.b64decode(obj["__bytes__"])
    if "__ndarray__" in obj:
        import numpy as np

        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_tree(stem: str | os.PathLike, obj: Any) -> list[Path]:
    """Write `stem.json` (and `stem.safetensors` if obj holds tensors); return the files written."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(obj, tensors, Path(stem).name)
    written = [Path(f"{stem}.json")]
    write_json(written[0], {"tree": encoded, "tensors": sorted(tensors)})
    if tensors:
        written.append(Path(f"{stem}.safetensors"))
        save_file(tensors, str(written[1]))
        with open(written[1], "rb+") as f:
            os.fsync(f.fileno())
    return written


def load_tree(stem: str | os.PathLike) -> Any:
    from safetensors.torch import load_file

    with open(f"{stem}.json") as f:
        doc = json.load(f)
    tensors = load_file(f"{stem}.safetensors") if doc["tensors"] else {}
    return _decode(doc["tree"], tensors)
