"""The GRPO maths against cases small enough to compute by hand (NLA.md's RL recipe)."""

from __future__ import annotations

import math

import pytest
import torch

from nla_mcore.rl.grpo import (
    NonFiniteRewardError,
    failed_reward,
    group_advantages,
    kl_penalty,
    policy_loss,
    rewards,
    sample_token_mean,
)


def test_rewards_linear_log_and_failures():
    mse = torch.tensor([0.5, 0.1, 3.0, 0.0])
    failed = torch.tensor([False, False, True, False])
    assert rewards(mse, failed).tolist() == pytest.approx([-0.5, -0.1, -2.0, -0.0])
    logged = rewards(mse, failed, "log").tolist()
    assert logged == pytest.approx(
        [-math.log(0.5), -math.log(0.1), -math.log(2.0), -math.log(1e-8)]
    )
    assert failed_reward("linear") == -2.0 and failed_reward("log") == pytest.approx(-math.log(2))
    with pytest.raises(ValueError, match="reward mode"):
        rewards(mse, failed, "square")


def test_a_nan_reward_is_caught_naming_the_sample():
    mse = torch.tensor([0.5, float("nan"), 0.2, float("inf")])
    with pytest.raises(NonFiniteRewardError, match=r"samples \[1, 3\] \(of 4\)"):
        rewards(mse, torch.zeros(4, dtype=torch.bool))
    # a failed sample's own mse is never read (its AR prompt may not even exist)
    assert rewards(mse, torch.tensor([False, True, False, True])).tolist() == pytest.approx(
        [-0.5, -2.0, -0.2, -2.0]
    )


def test_group_advantages_by_hand():
    # group 1: rewards 1, 2, 3 -> mean 2, unbiased std 1 -> -1, 0, 1 (over 1 + 1e-6)
    # group 2: all equal -> 0 (no signal, no division by zero)
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, -2.0, -2.0, -2.0]), 3)
    expected = [-1 / (1 + 1e-6), 0.0, 1 / (1 + 1e-6), 0.0, 0.0, 0.0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-7)
    assert group_advantages(torch.tensor([1.0, 5.0]), 1).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.ones(6), 4)


def test_ppo_clip_by_hand():
    """Two samples, ratios e^0.5 = 1.65 (clipped to 1.2 for A > 0) and e^-0.5 = 0.61 (clipped
    to 0.8 for A < 0: pessimistic -min picks the clipped 0.8·(-1) = -0.8)."""
    logp = torch.tensor([[0.5, 0.0], [-0.5, 0.0]])
    old = torch.zeros(2, 2)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, stats = policy_loss(logp, old, adv, mask, clip=0.2)
    # sample 0: tokens -min(1.6487, 1.2) = -1.2 and -min(1, 1) = -1 -> mean -1.1
    # sample 1: token -min(-0.6065, -0.8) = 0.8 (the second token is masked out)
    assert loss.item() == pytest.approx((-1.1 + 0.8) / 2, abs=1e-6)
    assert stats["clip_fraction"].item() == pytest.approx(2 / 3)
    assert stats["ratio_mean"].item() == pytest.approx((math.exp(0.5) + 1 + math.exp(-0.5)) / 3)


def test_ppo_gradient_is_zero_where_clipped():
    logp = torch.tensor([[0.5]], requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1))
    loss.backward()
    assert logp.grad.item() == 0.0  # ratio 1.65 > 1.2 with A > 0: no push further
    logp = torch.tensor([[0.1]], requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1))
    loss.backward()
    assert logp.grad.item() == pytest.approx(-math.exp(0.1))


def test_kl_k1_and_k3_by_hand():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    mask = torch.ones(1, 2)
    # k1 = logp - ref: 0.5 and -1 -> mean -0.25
    assert kl_penalty(logp, ref, mask, "k1").item() == pytest.approx(-0.25)
    # k3 = e^(ref-logp) - (ref-logp) - 1: e^-0.5 + 0.5 - 1 and e^1 - 1 - 1
    k3 = ((math.exp(-0.5) - 0.5) + (math.e - 2)) / 2
    assert kl_penalty(logp, ref, mask, "k3").item() == pytest.approx(k3)
    assert kl_penalty(ref, ref, mask, "k3").item() == 0.0
    with pytest.raises(ValueError, match="KL kind"):
        kl_penalty(logp, ref, mask, "k2")


def test_sample_token_mean_weighs_samples_equally():
    values = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    assert sample_token_mean(values, mask).item() == pytest.approx(3.0)  # not 9/5
    assert sample_token_mean(values, torch.zeros(2, 4)).item() == 0.0
