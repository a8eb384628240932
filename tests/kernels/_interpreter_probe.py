"""Does this Triton's interpreter run loops with a runtime bound? Import only where TRITON_INTERPRET=1.

Triton 3.6's interpreter (the GPU machine's) turns a runtime int into a 1-element NumPy array and
calls int() on it for `range(...)`, which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be
converted to Python scalars", triton-lang/triton#9171; fixed in later Triton, e.g. 3.9 here). The
compiled kernels are unaffected; interpreted tests of looping kernels skip on such an install.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.errors import InterpreterError


@triton.jit
def _count_kernel(out_ptr, n):
    acc = tl.zeros([1], dtype=tl.int32)
    for _ in range(0, n):
        acc += 1
    tl.store(out_ptr + tl.arange(0, 1), acc)


@functools.cache
def interpreter_runs_runtime_loops() -> bool:
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _count_kernel[(1,)](out, 3)
    except InterpreterError as e:
        if "0-dimensional" in str(e):
            return False
        raise
    return int(out[0]) == 3


def skip_unless_interpreter_runs_loops() -> None:
    if not interpreter_runs_runtime_loops():
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run runtime-bounded loops "
                    f"under NumPy {np.__version__} (triton-lang/triton#9171)")
