"""Triton kernels for per-token log-probs over a vocab shard (imported lazily by `logprob.py`).

Legend: T tokens, V the local (this rank's) vocab width, B the tile width along V.

One program per token streams its row of bf16 logits once, in tiles of B, with an online max and
sum-exp (and, for the entropy, the sum of exp(z - m) z), so nothing fp32 and [T, V]-sized exists.
The backward streams the row once more and writes the gradient in the logits' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _local_stats_kernel(logits_ptr, target_ptr, stats_ptr, v_local, stride_t, vocab_start,
                        inv_temp, BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    # stats[t] = (max_v z, sum_v exp(z - max), z[target] or 0, sum_v exp(z - max) z), z = x / temp
    tok = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + tok * stride_t
    col_B = tl.arange(0, BLOCK_V)
    m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), axis=0)
    s = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
    ez = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
    for start in range(0, v_local, BLOCK_V):
        mask_B = col_B + start < v_local
        z_B = tl.load(row_ptr + start + col_B, mask=mask_B, other=float("-inf"))
        z_B = z_B.to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z_B, axis=0))
        m_ref = tl.where(m_new == _NEG_INF, 0.0, m_new)  # all -inf so far: keep exp() finite
        alpha = tl.exp(m - m_ref)
        e_B = tl.exp(z_B - m_ref)
        s = s * alpha + tl.sum(e_B, axis=0)
        if WITH_ENTROPY:
            ez = ez * alpha + tl.sum(e_B * tl.where(e_B > 0.0, z_B, 0.0), axis=0)
        m = m_new
    tgt = tl.load(target_ptr + tok).to(tl.int64) - vocab_start
    in_shard = (tgt >= 0) & (tgt < v_local)
    zt = tl.load(row_ptr + tl.where(in_shard, tgt, 0), mask=in_shard, other=0.0)
    zt = tl.where(in_shard, zt.to(tl.float32) * inv_temp, 0.0)
    tl.store(stats_ptr + tok * 4, m)
    tl.store(stats_ptr + tok * 4 + 1, s)
    tl.store(stats_ptr + tok * 4 + 2, zt)
    tl.store(stats_ptr + tok * 4 + 3, ez)


@triton.jit
def _grad_kernel(logits_ptr, target_ptr, lse_ptr, mean_z_ptr, g_lp_ptr, g_ent_ptr, grad_ptr,
                 v_local, stride_t, stride_g, vocab_start, inv_temp,
                 BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    # d logp / dz_v = [v = target] - p_v;  d H / dz_v = -p_v (z_v - E_p[z]);  dz / dx = 1 / temp
    tok = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + tok * stride_t
    out_ptr = grad_ptr + tok * stride_g
    col_B = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + tok)
    g_lp = tl.load(g_lp_ptr + tok)
    tgt = tl.load(target_ptr + tok).to(tl.int64) - vocab_start
    if WITH_ENTROPY:
        mean_z = tl.load(mean_z_ptr + tok)
        g_ent = tl.load(g_ent_ptr + tok)
    for start in range(0, v_local, BLOCK_V):
        mask_B = col_B + start < v_local
        z_B = tl.load(row_ptr + start + col_B, mask=mask_B, other=0.0).to(tl.float32) * inv_temp
        p_B = tl.exp(z_B - lse)
        g_B = tl.where(col_B + start == tgt, g_lp, 0.0) - g_lp * p_B
        if WITH_ENTROPY:
            g_B -= g_ent * p_B * tl.where(p_B > 0.0, z_B - mean_z, 0.0)
        tl.store(out_ptr + start + col_B, (g_B * inv_temp).to(grad_ptr.dtype.element_ty),
                 mask=mask_B)


@dataclass(frozen=True, slots=True)
class LogprobConfig:
    """Launch shape; the benchmark sweeps it (4096 x 4 warps was best on an H100, 2026-11-25)."""

    block_v: int = 4096
    """Tile width along the vocab (a power of two)."""
    num_warps: int = 4
    """Warps per program."""


def local_stats(logits_TV: torch.Tensor, target_T: torch.Tensor, vocab_start: int,
                inv_temp: float, with_entropy: bool, out_T4: torch.Tensor,
                cfg: LogprobConfig = LogprobConfig()) -> None:
    """Writes this shard's per-token (max z, sum exp(z - max), z_target, sum e z) into fp32 out_T4."""
    t, v = logits_TV.shape
    if t:
        _local_stats_kernel[(t,)](logits_TV, target_T, out_T4, v, logits_TV.stride(0),
                                  vocab_start, inv_temp, BLOCK_V=cfg.block_v,
                                  WITH_ENTROPY=with_entropy, num_warps=cfg.num_warps)


def logits_grad(logits_TV: torch.Tensor, target_T: torch.Tensor, lse_T: torch.Tensor,
                mean_z_T: torch.Tensor | None, g_lp_T: torch.Tensor, g_ent_T: torch.Tensor | None,
                vocab_start: int, inv_temp: float, out_TV: torch.Tensor,
                cfg: LogprobConfig = LogprobConfig()) -> None:
    """Writes d sum_t (g_lp logp + g_ent H) / d logits into out_TV (the logits' dtype)."""
    t, v = logits_TV.shape
    with_entropy = g_ent_T is not None
    if t:
        _grad_kernel[(t,)](logits_TV, target_T, lse_T, mean_z_T if with_entropy else lse_T,
                           g_lp_T, g_ent_T if with_entropy else g_lp_T, out_TV, v,
                           logits_TV.stride(0), out_TV.stride(0), vocab_start, inv_temp,
                           BLOCK_V=cfg.block_v, WITH_ENTROPY=with_entropy,
                           num_warps=cfg.num_warps)
