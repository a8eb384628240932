"""Data order and micro-batching: what exact resume and DP-size changes rely on."""

from __future__ import annotations

import numpy as np

from nla_mcore.data.batching import (
    epoch_order,
    global_batch,
    padding_fraction,
    plan_evaluation,
    plan_microbatches,
)


def test_order_is_a_pure_function_of_seed_epoch_and_index():
    """The same (seed, step) gives the same samples in any process; each epoch visits every
    sample once; another seed gives another order."""
    a = [global_batch(10, seed=3, step=s, global_batch_size=4) for s in range(5)]
    b = [global_batch(10, seed=3, step=s, global_batch_size=4) for s in range(5)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    stream = np.concatenate(a)  # 20 positions = two epochs of 10
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert np.array_equal(stream[:10], epoch_order(10, 3, 0))
    assert not np.array_equal(epoch_order(10, 3, 0), epoch_order(10, 4, 0))
    assert not np.array_equal(epoch_order(10, 3, 0), epoch_order(10, 3, 1))


def test_a_step_trains_on_the_same_samples_at_any_dp_size():
    """Resuming at another DP size must not change which samples a step sees."""
    lengths = np.random.default_rng(0).integers(20, 200, size=64)
    batch = global_batch(64, seed=1, step=7, global_batch_size=16)
    for dp in (1, 2, 4):
        plans = plan_microbatches(batch, lengths, dp=dp, micro_batch_size=2, pad_multiple=8)
        seen = np.concatenate([s for p in plans for s in p.samples])
        assert sorted(seen) == sorted(batch)
        assert all(len(p.samples) == 16 // (dp * 2) for p in plans)


def test_bucketing_pads_little_and_balances_the_ranks():
    """Sorted by length, micro-batches pad far less than random grouping would; the snake
    assignment keeps the ranks' token counts close."""
    rng = np.random.default_rng(1)
    lengths = rng.integers(100, 400, size=256)
    batch = np.arange(256)
    plans = plan_microbatches(batch, lengths, dp=4, micro_batch_size=8, pad_multiple=16)
    assert padding_fraction(plans) < 0.05
    for plan in plans:
        for samples, padded in zip(plan.samples, plan.lengths, strict=True):
            assert padded % 16 == 0 and padded >= lengths[samples].max()
    tokens = [p.real_tokens for p in plans]
    assert max(tokens) / min(tokens) < 1.05
    random_groups = rng.permutation(256).reshape(-1, 8)
    random_padding = 1 - lengths.sum() / sum(
        -(-lengths[g].max() // 16) * 16 * 8 for g in random_groups
    )
    assert padding_fraction(plans) < random_padding / 4


def test_evaluation_plan_covers_every_sample_once():
    """Held-out sets need not divide into ranks × micro-batches; a rank may get nothing."""
    lengths = np.arange(1, 12)
    for dp in (1, 2, 16):
        plans = plan_evaluation(lengths, dp=dp, micro_batch_size=4, pad_multiple=1)
        seen = sorted(np.concatenate([s for p in plans for s in p.samples]).tolist())
        assert seen == list(range(11))
        assert len(plans) == dp
