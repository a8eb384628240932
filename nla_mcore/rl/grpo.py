"""The GRPO maths of NLA.md's RL recipe, as small functions on tensors (no model, no engine).

    reward     -mse_nrm of the live AR's reconstruction ("linear"), or -log(max(mse_nrm, 1e-8))
               ("log"); a sample that failed (unparseable, truncated, or an AR prompt over the
               context limit) gets the reward of an orthogonal prediction, mse_nrm = 2:
               -2.0, or -log 2 in log mode
    advantage  (r - mean of its group) / (std of its group + 1e-6), one value per sample,
               broadcast to every response token; std is the unbiased (Bessel) one, as
               `torch.std`; a group whose rewards are all equal has advantage 0
    policy     PPO-clip: per token -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) with
               ratio = exp(logp - logp_old); a per-sample token mean, then the mean over samples
    KL         to the reference (SFT) policy, per token: k1 = logp - logp_ref, or
               k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1 (non-negative); reduced like
               the policy loss and added with its coefficient (0.01 in NLA.md)

Legend: N samples (G per group, groups contiguous: the engines' prompt-major order), T tokens.
"""

from __future__ import annotations

import math

import torch

REWARD_MODES = ("linear", "log")
KL_KINDS = ("k1", "k3")
FAILED_MSE_NRM = 2.0  # what an orthogonal prediction scores at mse_scale = sqrt(d)
ADVANTAGE_EPS = 1e-6


class NonFiniteRewardError(FloatingPointError):
    """A NaN or inf reward, caught before it reaches the advantages (names the samples)."""


def rewards(mse_nrm_N: torch.Tensor, failed_N: torch.Tensor, mode: str = "linear") -> torch.Tensor:
    """[N] float32 rewards; failed samples get the orthogonal prediction's reward."""
    if mode not in REWARD_MODES:
        raise ValueError(f"reward mode must be one of {REWARD_MODES}, got {mode!r}")
    mse_N = torch.where(failed_N, torch.full_like(mse_nrm_N, FAILED_MSE_NRM), mse_nrm_N).float()
    bad = (~torch.isfinite(mse_N)).nonzero().flatten().tolist()
    if bad:
        raise NonFiniteRewardError(
            f"non-finite mse_nrm for samples {bad[:8]}{' ...' if len(bad) > 8 else ''} "
            f"(of {len(mse_N)}): the AR's reconstruction overflowed or a vector was bad"
        )
    if mode == "log":
        return -torch.log(mse_N.clamp_min(1e-8))
    return -mse_N


def group_advantages(rewards_N: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] advantages, normalised within each group of `group_size` consecutive samples."""
    n = rewards_N.numel()
    if group_size < 1 or n % group_size:
        raise ValueError(f"{n} rewards do not form groups of {group_size}")
    if group_size == 1:
        return torch.zeros_like(rewards_N, dtype=torch.float32)  # no group to compare with
    grouped_GK = rewards_N.float().view(-1, group_size)
    centred_GK = grouped_GK - grouped_GK.mean(dim=1, keepdim=True)
    return (centred_GK / (grouped_GK.std(dim=1, keepdim=True) + ADVANTAGE_EPS)).flatten()


def sample_token_mean(values_NT: torch.Tensor, mask_NT: torch.Tensor) -> torch.Tensor:
    """Mean over each sample's response tokens, then over samples (empty samples count 0)."""
    mask_NT = mask_NT.float()
    per_sample_N = (values_NT * mask_NT).sum(dim=1) / mask_NT.sum(dim=1).clamp_min(1.0)
    return per_sample_N.mean()


def policy_loss(
    logp_NT: torch.Tensor,
    old_logp_NT: torch.Tensor,
    advantages_N: torch.Tensor,
    mask_NT: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(PPO-clip loss, {clip_fraction, ratio_mean}) over the masked response tokens."""
    ratio_NT = torch.exp(logp_NT - old_logp_NT)
    adv_N1 = advantages_N[:, None].to(ratio_NT.dtype)
    unclipped_NT = ratio_NT * adv_N1
    clipped_NT = ratio_NT.clamp(1.0 - clip, 1.0 + clip) * adv_N1
    loss = sample_token_mean(-torch.minimum(unclipped_NT, clipped_NT), mask_NT)
    mask = mask_NT.bool()
    with torch.no_grad():
        was_clipped_NT = (clipped_NT < unclipped_NT) & mask  # where the clip took effect
        tokens = mask.sum().clamp_min(1)
        stats = {
            "clip_fraction": was_clipped_NT.sum() / tokens,
            "ratio_mean": (ratio_NT * mask).sum() / tokens,
        }
    return loss, stats


def kl_penalty(
    logp_NT: torch.Tensor, ref_logp_NT: torch.Tensor, mask_NT: torch.Tensor, kind: str = "k1"
) -> torch.Tensor:
    """The KL estimate to the reference policy, reduced as the policy loss is."""
    if kind not in KL_KINDS:
        raise ValueError(f"KL kind must be one of {KL_KINDS}, got {kind!r}")
    log_ratio_NT = ref_logp_NT - logp_NT
    if kind == "k1":
        kl_NT = -log_ratio_NT
    else:
        kl_NT = torch.exp(log_ratio_NT) - log_ratio_NT - 1.0
    return sample_token_mean(kl_NT, mask_NT)


def failed_reward(mode: str) -> float:
    """The reward a failed sample gets in `mode`."""
    return -FAILED_MSE_NRM if mode == "linear" else -math.log(FAILED_MSE_NRM)
