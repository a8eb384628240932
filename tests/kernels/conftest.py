"""Fixtures for the kernel tests, and the split between in-process and interpreted cases.

Triton runs kernels on CPU tensors only in its interpreter, which must be chosen (TRITON_INTERPRET=1)
before `triton.language` is first imported, and Megatron-Core imports Triton; setting the variable
from a conftest would come too late, and setting it for the whole suite would also make the GPU tests
interpret their kernels instead of compiling them. So tests that use the `triton_interpreter`
fixture are deselected here and run by `test_kernels_interpreted.py` in a child pytest process
started with TRITON_INTERPRET=1, which in turn selects only them. Running
`TRITON_INTERPRET=1 pytest tests/kernels` by hand runs everything in one process.
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRETER_ONLY_ENV = "NLA_KERNEL_TESTS_INTERPRETER_ONLY"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@pytest.fixture
def triton_interpreter():
    """Marks a test that runs Triton kernels on CPU tensors in the interpreter."""
    pytest.importorskip("triton")
    if not interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 from process start (see tests/kernels/conftest.py)")


@pytest.fixture
def rng():
    """A CPU generator with a fresh seed each run; failure messages print `rng.initial_seed()`."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    ours = [it for it in items if str(it.path).startswith(here)]
    if interpreting():
        if os.environ.get(INTERPRETER_ONLY_ENV) != "1":
            return
        drop = [it for it in ours if "triton_interpreter" not in it.fixturenames]
    else:
        drop = [it for it in ours if "triton_interpreter" in it.fixturenames]
    if drop:
        dropped = set(map(id, drop))
        config.hook.pytest_deselected(items=drop)
        items[:] = [it for it in items if id(it) not in dropped]
