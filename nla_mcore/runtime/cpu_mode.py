"""CPU functional mode: run Megatron-Core 0.16.1 on the CPU under `gloo`.

Megatron-Core assumes CUDA in a handful of places that have nothing to do with the maths:
`torch.cuda.current_device()` as an allocation device (tensor-parallel mappings, RoPE,
pipeline p2p buffers), factories with a hard-coded `device="cuda"` (`get_default_causal_mask`,
the schedules' token counter), the CUDA RNG tracker (`tensor_parallel/random.py`), and
`torch.cuda.synchronize()` / `current_stream()` around pipeline p2p.  This module routes exactly
those to the CPU so that the real modules, the real schedules and the real collectives run in CI:

* a `TorchFunctionMode` rewrites any CUDA (or integer) `device=` argument, `Tensor.cuda()` and
  `Tensor.to("cuda")` to the CPU, drops `pin_memory` requests, and reports `Tensor.type()` with
  the CUDA type name (the optimizer's gradient clipping asserts it);
* `torch.cuda.current_device()` returns `"cpu"`: Megatron-Core uses it only as a placement
  (`device=...`, `.to(...)`), and a plain value keeps working inside autograd's backward, where
  a torch function mode is not active (a mode is suspended while its handler runs, so code
  nested in a handled call, such as `torch.autograd.backward`, escapes it);
* `synchronize`, `current_stream`, `set_device` and memory statistics become no-ops;
* the CUDA RNG state used by Megatron's RNG tracker is the CPU generator's state, so
  `get_cuda_rng_tracker().fork()` forks the CPU generator (weight init and dropout in
  tensor-parallel regions stay rank-correct).

Trade-off: this is monkey-patching a pinned library version; it is kept in this one module, off
unless `enable()` is called (the runtime calls it only when the device is the CPU), and the
equivalence tests are what prove it faithful.  A torch function mode is thread-local: it covers
the forward and the backward (CPU autograd runs on the calling thread) of the thread that
enabled it; hard-coded `"cuda"` factories are only reached from forward-side code, which the
mode covers.
"""

from __future__ import annotations

import threading

import torch
from torch.overrides import TorchFunctionMode

_lock = threading.Lock()
_enabled = False
_mode: _CudaToCpuMode | None = None

_TO_METHODS = {torch.Tensor.to}
_CUDA_METHODS = {torch.Tensor.cuda, torch.Tensor.pin_memory}
_TYPE_METHOD = torch.Tensor.type


def _is_cuda_device(device) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to the CPU for every torch call made while it is active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _CUDA_METHODS:
            return args[0]
        if func is _TYPE_METHOD and len(args) == 1 and not kwargs:
            # clip_grads asserts `grad.type() == 'torch.cuda.FloatTensor'`: answer as CUDA would.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False  # pinned host memory needs a CUDA driver
        if func in _TO_METHODS and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for `torch.cuda.current_stream()`: CPU work is already ordered."""

    def synchronize(self) -> None:
        return None

    def wait_stream(self, _stream) -> None:
        return None

    def record_event(self, _event=None) -> None:
        return None

    def wait_event(self, _event) -> None:
        return None


def _cpu_rng_state(*_args, **_kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, *_args, **_kwargs) -> None:
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all, i.e. back into this patch.
    torch.default_generator.manual_seed(seed)


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.set_device = lambda _device: None
    cuda.synchronize = lambda *_a, **_k: None
    cuda.current_stream = lambda *_a, **_k: _NullStream()
    cuda.get_rng_state = _cpu_rng_state
    cuda.set_rng_state = _set_cpu_rng_state
    cuda.manual_seed = _cpu_manual_seed
    cuda.manual_seed_all = lambda _seed: None  # torch.manual_seed already seeded the CPU
    for stat in ("memory_allocated", "max_memory_allocated", "memory_reserved"):
        setattr(cuda, stat, lambda *_a, **_k: 0)
    cuda.reset_peak_memory_stats = lambda *_a, **_k: None
    cuda.empty_cache = lambda: None


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = _cpu_rng_state
    mcore_random._set_cuda_rng_state = _set_cpu_rng_state


def enable() -> None:
    """Route Megatron-Core's CUDA-only calls to the CPU in this process (idempotent).

    Must be called on the thread that runs the model; refuses when CUDA is available, since
    the patches would silently move a GPU run to the CPU.
    """
    global _enabled, _mode
    with _lock:
        if _enabled:
            return
        if torch.cuda.is_available():
            raise RuntimeError(
                "CPU functional mode was requested on a machine with CUDA; use device=cuda, or "
                "hide the GPUs with CUDA_VISIBLE_DEVICES= to test the CPU path."
            )
        _patch_torch_cuda()
        _patch_megatron_rng()
        _mode = _CudaToCpuMode()
        _mode.__enter__()
        _enabled = True


def is_enabled() -> bool:
    """True once `enable()` has run in this process."""
    return _enabled
