"""Backend choice and lazy Triton access shared by the kernels.

Design decision: Triton is optional. Nothing here imports it, and the kernel modules
(`_nmse_triton.py`, `_logprob_triton.py`) are imported only when a Triton backend is used, so the
PyTorch paths work on a machine without it.

Triton kernels run on CPU tensors only in Triton's interpreter, which is chosen per process:
`TRITON_INTERPRET=1` must be in the environment before `triton.language` is first imported (its
standard library, `tl.sum` and friends, is decorated at that moment). Megatron-Core imports Triton,
so in practice the variable must be set when the process starts; the tests therefore run their
interpreted cases in a subprocess (`tests/kernels/test_kernels_interpreted.py`).
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    """True when the `triton` package can be imported (it need not have a GPU)."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """Map `backend` in {"auto", "triton", "torch"} to "triton" or "torch" for a tensor on x's device.

    "auto" picks Triton for CUDA tensors (when installed) and PyTorch otherwise; "triton" on a CPU
    tensor runs the kernel in Triton's interpreter (slow: for tests), which must have been chosen
    with TRITON_INTERPRET=1 before Triton was imported.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise RuntimeError("backend='triton' needs the `triton` package; use backend='torch'")
    if backend == "triton" and not x.is_cuda and not interpreting():
        raise RuntimeError("backend='triton' on a CPU tensor needs Triton's interpreter: start the "
                           "process with TRITON_INTERPRET=1 (before triton is imported)")
    return backend


def interpreting() -> bool:
    """True when this process asked Triton for its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << (max(n, 1) - 1).bit_length()
