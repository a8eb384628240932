"""`nla-mcore quickstart`, the README's first command, end to end through torchrun (2 ranks, TP=2)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from nla_mcore.toy import TOY_HF_CONFIGS
from nla_mcore.toy_tokenizers import VOCAB_SIZE


def test_toy_models_cover_toy_tokenizers():
    assert all(c["vocab_size"] == VOCAB_SIZE for c in TOY_HF_CONFIGS.values())


@pytest.mark.slow
def test_quickstart_trains_and_loss_falls():
    """Why: the README promises this command works on a fresh CPU machine and shows learning."""
    out = subprocess.run(
        [sys.executable, "-m", "nla_mcore.cli", "quickstart", "steps=6", "lr=1e-2"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"step +\d+/6 +loss ([0-9.]+)", out.stdout)]
    assert len(losses) == 6, out.stdout
    assert losses[-1] < losses[0] - 0.3, losses
    assert "tp=2" in out.stdout and "world=2" in out.stdout


def test_invalid_layout_fails_before_launch():
    """A bad config must fail in the CLI, naming the key, without starting ranks."""
    out = subprocess.run(
        [sys.executable, "-m", "nla_mcore.cli", "quickstart", "parallel.sequence_paralel=true"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    assert "parallel.sequence_paralel" in out.stderr
