"""Training health: the message of a non-finite step, and loss-spike warnings.

A non-finite loss or gradient norm stops the run before the optimizer touches the weights
(`optim.optimizer_step`).  The message must let a user find the cause, so every rank reports
which of its micro-batches had a non-finite loss and which samples they held (`file row r
(doc_id …)`); the reports are gathered so every rank raises the same, complete message.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

import torch

MAX_SAMPLES_NAMED = 8


@dataclass(kw_only=True, slots=True)
class HealthConfig:
    """Loss-spike warnings (non-finite steps always stop the run)."""

    spike_factor: float = 3.0
    """Warn when a step's loss exceeds this factor times the median of the recent window."""
    spike_window: int = 20
    """Steps in the window (warnings start once it is half full)."""

    def __post_init__(self):
        if self.spike_factor <= 1 or self.spike_window < 2:
            raise ValueError("health.spike_factor must be > 1 and health.spike_window >= 2")


class SpikeDetector:
    """Flags a loss far above the recent median."""

    def __init__(self, cfg: HealthConfig):
        self.cfg = cfg
        self.recent: deque[float] = deque(maxlen=cfg.spike_window)

    def check(self, loss: float) -> float | None:
        """The recent median if `loss` is a spike, else None; then remember `loss`."""
        median = statistics.median(self.recent) if self.recent else None
        spike = (
            len(self.recent) >= self.cfg.spike_window // 2
            and median is not None
            and median > 0
            and loss > self.cfg.spike_factor * median
        )
        self.recent.append(loss)
        return median if spike else None


def explain_nonfinite(
    step: int, loss: float, grad_norm: float, local_sums, microbatch_samples: list[list[str]]
) -> str:
    """The error message of a non-finite step (collective: every rank calls it)."""
    rank = torch.distributed.get_rank()
    bad = [k for k, (total, _) in enumerate(local_sums) if not math.isfinite(total)]
    report = [
        f"rank {rank} micro-batch {k}: non-finite loss, samples " + _names(microbatch_samples[k])
        for k in bad
    ]
    reports: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(reports, report)
    lines = [line for per_rank in reports for line in per_rank]
    head = (
        f"step {step}: loss {loss}, gradient norm {grad_norm}: stopping before the optimizer "
        "step (the weights are those of the previous step)"
    )
    if not lines:
        lines = [
            "every micro-batch loss is finite: the gradient overflowed in the backward pass; "
            f"rank {rank} held " + "; ".join(_names(s) for s in microbatch_samples)
        ]
    return head + "\n  " + "\n  ".join(lines)


def _names(samples: list[str]) -> str:
    shown = ", ".join(samples[:MAX_SAMPLES_NAMED])
    more = len(samples) - MAX_SAMPLES_NAMED
    return shown + (f" (+{more} more)" if more > 0 else "")
