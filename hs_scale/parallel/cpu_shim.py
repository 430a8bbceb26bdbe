"""The CPU compatibility shim megatron-core 0.16 needs when CUDA is absent (gloo on CPU).

megatron-core assumes a GPU in three places that the tensor/pipeline/data-parallel paths we use reach on CPU:

1. RNG tracker (`model_parallel_cuda_manual_seed`, `get_cuda_rng_tracker().fork()` around dropout in TP
   regions, activation checkpointing): it reads and writes the *CUDA* generator. On CPU the CPU generator plays
   that role, so the tracker's get/set/seed calls are pointed at it.
2. `torch.cuda.current_device()` used as an allocation device by the pipeline p2p code, the sequence-parallel
   mappings and the DDP grad buffer: it answers "cpu" inside those modules only.
3. Literal `device="cuda"` allocations (the pipeline schedules' token counter) and `torch.cuda.synchronize()`
   after batched p2p: redirected to CPU / made a no-op inside those modules only.

NOTE: nothing global is patched. Each listed megatron module gets its own `torch` name rebound to a thin proxy
(`_TorchOnCpu`) that forwards everything to the real torch except the CUDA-only calls above; other code in the
process (DeepSpeed, the rest of hs_scale, user code) still sees the real `torch.cuda`. `apply_cpu_shim()` does
nothing when CUDA is available (unless forced, for tests), is idempotent, and `remove_cpu_shim()` undoes it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types

import torch

# Modules whose module-level name `torch` is rebound to the proxy (why each one is listed):
_DEVICE_MODULES = (
    "megatron.core.pipeline_parallel.p2p_communication",  # current_device() for recv buffers, synchronize()
    "megatron.core.pipeline_parallel.schedules",  # torch.zeros(..., device="cuda") token counter, autocast
    "megatron.core.tensor_parallel.mappings",  # sequence-parallel gather/scatter buffers
    "megatron.core.tensor_parallel.utils",  # gather_split_1d_tensor buffers
    "megatron.core.tensor_parallel.layers",  # sequence-parallel all-gather buffer in the linear autograd fn
    "megatron.core.distributed.param_and_grad_buffer",  # DDP grad buffer allocated on current_device()
)
_RANDOM_MODULE = "megatron.core.tensor_parallel.random"

_originals: dict[tuple[str, str], object] = {}  # (module or class path, attribute) -> original value


def _is_cuda_device(device: object) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


def _redirect_device(fn):
    """Wrap a tensor factory so that device="cuda" (or cuda:N) allocates on CPU instead."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    return wrapper


class _CudaOnCpu(types.ModuleType):
    """Stands in for `torch.cuda` inside the shimmed megatron modules."""

    def __init__(self) -> None:
        super().__init__("torch.cuda[hs_scale cpu shim]")

    def __getattr__(self, name: str):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def synchronize(device=None) -> None:  # CPU collectives are synchronous once waited on
        return None

    # Used by the RNG tracker (random module): the CPU generator is "the device generator".
    @staticmethod
    def get_rng_state(device="cuda") -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state: torch.Tensor, device="cuda") -> None:
        torch.set_rng_state(new_state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)


class _TorchOnCpu(types.ModuleType):
    """Stands in for `torch` inside the shimmed megatron modules: everything forwards to the real torch."""

    _FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "randn", "rand")

    def __init__(self) -> None:
        super().__init__("torch[hs_scale cpu shim]")
        self.cuda = _CudaOnCpu()
        for name in self._FACTORIES:
            setattr(self, name, _redirect_device(getattr(torch, name)))

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def autocast(device_type: str = "cuda", *args, **kwargs):
        return torch.autocast("cpu" if device_type == "cuda" else device_type, *args, **kwargs)


def _cpu_get_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device=-1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


@contextlib.contextmanager
def _cpu_fork(self, name: str = "model-parallel-rng"):
    """CudaRNGStatesTracker.fork on the CPU generator.

    Same semantics as megatron's: swap the tracked state in, run, save it back, restore the previous state.
    The original also warns when the CPU generator changed inside the fork; on CPU the tracked state *is* the
    CPU generator, so that warning would fire on every dropout and is left out.
    """
    if name not in self.states_:
        raise Exception(f"rng state {name} is not added")
    orig_state = torch.get_rng_state()
    orig_name = self._current_state_name
    if orig_name != "default-rng":
        self.states_[orig_name] = orig_state
    torch.set_rng_state(self.states_[name])
    self._current_state_name = name
    try:
        yield
    finally:
        self.states_[name] = torch.get_rng_state()
        if orig_name != "default-rng":
            orig_state = self.states_[orig_name]
        torch.set_rng_state(orig_state)
        self._current_state_name = orig_name


def _swap(owner: object, owner_path: str, attr: str, new: object) -> None:
    key = (owner_path, attr)
    if key not in _originals:
        _originals[key] = getattr(owner, attr)
    setattr(owner, attr, new)


def is_cpu_shim_applied() -> bool:
    return bool(_originals)


def apply_cpu_shim(force: bool = False) -> bool:
    """Make megatron-core usable on CPU/gloo. Returns True when the shim is (now or already) in place.

    Does nothing and returns False when CUDA is available, unless `force` (tests use it to check the shim on
    a machine that has a GPU). Idempotent: a second call changes nothing.
    """
    if torch.cuda.is_available() and not force:
        return False
    if is_cpu_shim_applied():
        return True
    proxy = _TorchOnCpu()
    for path in _DEVICE_MODULES:
        _swap(importlib.import_module(path), path, "torch", proxy)
    random = importlib.import_module(_RANDOM_MODULE)
    _swap(random, _RANDOM_MODULE, "torch", proxy)  # tracker.add and manual_seed call torch.cuda.* directly
    _swap(random, _RANDOM_MODULE, "_get_cuda_rng_state", _cpu_get_rng_state)
    _swap(random, _RANDOM_MODULE, "_set_cuda_rng_state", _cpu_set_rng_state)
    tracker_path = f"{_RANDOM_MODULE}.CudaRNGStatesTracker"
    _swap(random.CudaRNGStatesTracker, tracker_path, "fork", _cpu_fork)
    return True


def remove_cpu_shim() -> None:
    """Undo `apply_cpu_shim` (tests only; real runs keep the shim for the life of the process)."""
    for (path, attr), original in list(_originals.items()):
        if path.endswith(".CudaRNGStatesTracker"):
            owner = importlib.import_module(path.rsplit(".", 1)[0]).CudaRNGStatesTracker
        else:
            owner = importlib.import_module(path)
        setattr(owner, attr, original)
    _originals.clear()
