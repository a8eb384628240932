"""Runs the Triton kernel tests (those using the `triton_interpreter` fixture) under
TRITON_INTERPRET=1 in a child pytest process; conftest.py says why they cannot run in this one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nla_mcore.kernels._triton import interpreting

HERE = Path(__file__).resolve().parent
INTERPRETER_ONLY_ENV = "NLA_KERNEL_TESTS_INTERPRETER_ONLY"  # read by conftest.py


def test_triton_kernels_under_the_interpreter():
    """CI has no GPU, so the only check of the Triton kernels' indexing, masking and maths there is
    Triton's interpreter on CPU tensors. This starts `pytest tests/kernels` with TRITON_INTERPRET=1
    and the interpreted cases selected, and fails with their report if any of them fails."""
    pytest.importorskip("triton")
    if interpreting():
        pytest.skip("this process interprets: the cases run here directly")
    env = dict(os.environ, TRITON_INTERPRET="1", **{INTERPRETER_ONLY_ENV: "1"})
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE)]
    proc = subprocess.run(cmd, cwd=HERE.parents[1], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"interpreted kernel tests failed:\n{proc.stdout}\n{proc.stderr}"
    assert " passed" in proc.stdout, f"no interpreted test ran:\n{proc.stdout}"
