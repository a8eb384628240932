"""The learning-rate schedule a run follows, spike warnings, and how metric files are read."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nla_mcore.train.health import HealthConfig, SpikeDetector
from nla_mcore.train.metrics import read_metrics
from nla_mcore.train.optim import OptimConfig, build_scheduler


def lrs(total: int, **cfg) -> list[float]:
    """The lr of updates 1..total, advancing the schedule as optim.optimizer_step does."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    scheduler = build_scheduler(optimizer, OptimConfig(**cfg), total)
    out = []
    for _ in range(total):
        scheduler.step(increment=1)
        out.append(optimizer.param_groups[0]["lr"])
    return out


def test_warmup_reaches_the_peak_and_cosine_ends_at_min_lr():
    """No step runs at lr 0; the warm-up's last step is at the peak; the last step at min_lr."""
    got = lrs(20, lr=1e-3, min_lr=1e-4, warmup_steps=4, decay="cosine")
    assert got[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert got[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(got[3:], got[4:], strict=False))  # decays monotonically
    mid = 4 + (20 - 4) // 2  # half-way through the decay: the mean of peak and floor
    assert got[mid - 1] == pytest.approx((1e-3 + 1e-4) / 2)


def test_constant_and_wsd_shapes():
    assert lrs(10, lr=2e-5, min_lr=2e-5, warmup_steps=0, decay="constant") == [2e-5] * 10
    wsd = lrs(20, lr=1e-3, min_lr=0.0, warmup_steps=2, decay="wsd", wsd_fraction=0.25)
    assert wsd[2:15] == [pytest.approx(1e-3)] * 13  # stable until the last quarter
    assert wsd[-1] == pytest.approx(0.0) and wsd[16] < wsd[15]


def test_spike_detector_needs_history_and_a_clear_jump():
    spikes = SpikeDetector(HealthConfig(spike_factor=3.0, spike_window=6))
    assert [spikes.check(v) for v in (1.0, 9.0, 1.0, 1.1, 0.9)] == [None] * 5  # warming up
    assert spikes.check(2.5) is None
    assert spikes.check(4.0) == pytest.approx(1.05)  # > 3x the recent median (1.0, 1.1)


def test_resumed_steps_replace_the_records_they_retrain(tmp_path):
    """A run resumed from step 2 trains steps 3.. again: the later records win."""
    path = tmp_path / "metrics.jsonl"
    records = [
        ("train", 1, 5.0),
        ("train", 2, 4.0),
        ("train", 3, math.inf),
        ("eval", 0, 9.0),
        ("train", 3, 3.0),
        ("train", 4, 2.0),
    ]
    path.write_text(
        "".join(json.dumps({"kind": k, "step": s, "loss": v}) + "\n" for k, s, v in records)
    )
    got = read_metrics(path)
    assert [(r["step"], r["loss"]) for r in got["train"]] == [
        (1, 5.0),
        (2, 4.0),
        (3, 3.0),
        (4, 2.0),
    ]
    assert [r["step"] for r in got["eval"]] == [0]
