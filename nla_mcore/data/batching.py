"""Which samples a step trains on, and how they are cut into micro-batches: pure functions.

* **Order.** Sample order is a pure function of `(seed, epoch, index)`: epoch e visits the
  samples in the permutation `epoch_order(n, seed, e)`, and the stream of epochs is cut into
  global batches of `global_batch_size`.  Step s trains on stream positions
  `[s·G, (s+1)·G)`, so `consumed_samples = s·G` is all a checkpoint needs to resume exactly,
  whatever the data-parallel size before and after.
* **Length bucketing, not packing.** A global batch is sorted by length and cut into
  micro-batches of similar lengths, each padded only to its own longest sample (rounded up to
  `pad_multiple`, which CP and SP need).  Packing several samples per row with per-sample
  attention would need a varlen attention kernel (TE's `thd` format or flash-attn's varlen),
  neither of which is on every machine we run on, and would complicate CP's load-balanced split
  and the AR's read-out; at NLA's lengths (AV ~250, AR ~126 tokens, narrow spreads) bucketing
  leaves a few percent of padding, which `padding_fraction` reports.
* **Balance.** Micro-batches go to data-parallel ranks in snake order (0, 1, …, dp-1, dp-1, …, 0)
  so that every rank gets a similar number of tokens.

Legend: N samples in the set, G global batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of `range(n)` that epoch `epoch` visits (same on every machine)."""
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n)


def global_batch(n: int, *, seed: int, step: int, global_batch_size: int) -> np.ndarray:
    """Sample indices of step `step`: stream positions [step·G, (step+1)·G) over the epochs."""
    if n < 1:
        raise ValueError("no samples to draw a batch from")
    start = step * global_batch_size
    positions = np.arange(start, start + global_batch_size)
    epochs = positions // n
    out = np.empty(global_batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        order = epoch_order(n, seed, int(epoch))
        mask = epochs == epoch
        out[mask] = order[positions[mask] % n]
    return out


@dataclass(frozen=True)
class MicroBatchPlan:
    """This DP rank's micro-batches for one step: sample indices and padded length of each."""

    samples: list[np.ndarray]
    lengths: list[int]
    real_tokens: int
    padded_tokens: int


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def plan_microbatches(
    indices: np.ndarray,
    sample_lengths_N: np.ndarray,
    *,
    dp: int,
    micro_batch_size: int,
    pad_multiple: int,
) -> list[MicroBatchPlan]:
    """Cut one global batch into micro-batches of similar lengths; one plan per DP rank."""
    if len(indices) % (dp * micro_batch_size):
        raise ValueError(
            f"a batch of {len(indices)} samples does not split into dp={dp} ranks × "
            f"micro-batches of {micro_batch_size}"
        )
    return _plans(indices, sample_lengths_N, dp, micro_batch_size, pad_multiple)


def plan_evaluation(
    sample_lengths_N: np.ndarray, *, dp: int, micro_batch_size: int, pad_multiple: int
) -> list[MicroBatchPlan]:
    """Every sample of an evaluation set once, in micro-batches of similar lengths; the last
    micro-batch may be smaller and a DP rank may get none."""
    indices = np.arange(len(sample_lengths_N))
    return _plans(indices, sample_lengths_N, dp, micro_batch_size, pad_multiple)


def _plans(indices, sample_lengths_N, dp, micro_batch_size, pad_multiple) -> list[MicroBatchPlan]:
    lengths = sample_lengths_N[indices]
    order = np.lexsort((indices, -lengths))  # longest first; ties by sample index
    chunks = [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    per_rank: list[list[np.ndarray]] = [[] for _ in range(dp)]
    for j, chunk in enumerate(chunks):
        lap, pos = divmod(j, dp)
        per_rank[pos if lap % 2 == 0 else dp - 1 - pos].append(chunk)
    plans = []
    for chunks_of_rank in per_rank:
        padded = [round_up(int(lengths[c].max()), pad_multiple) for c in chunks_of_rank]
        plans.append(
            MicroBatchPlan(
                samples=[indices[c] for c in chunks_of_rank],
                lengths=padded,
                real_tokens=int(sum(lengths[c].sum() for c in chunks_of_rank)),
                padded_tokens=int(
                    sum(p * len(c) for p, c in zip(padded, chunks_of_rank, strict=True))
                ),
            )
        )
    return plans


def padding_fraction(plans: list[MicroBatchPlan]) -> float:
    """Share of the step's computed tokens (over all DP ranks) that are padding."""
    padded = sum(p.padded_tokens for p in plans)
    return 1.0 - sum(p.real_tokens for p in plans) / padded if padded else 0.0
