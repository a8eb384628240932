"""Triton kernels for the normalised MSE (imported lazily by `nmse.py`; needs `triton`).

Legend: N rows, D the vector width; R rows per program, B the tile width along D.

One program handles R rows. When a whole row fits in one tile (B >= D, the default up to D = 8192)
the row is read from HBM once and held in registers: norms, the difference and (backward) the
projection are computed from those registers, so the kernel is one pass over the bytes. Wider rows
loop over D in tiles: two passes forward and three backward over the row, the later ones served by L2
since a program's rows (a few tens of KB) are still cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._triton import next_power_of_2

_EPS = tl.constexpr(1e-12)  # NLA.md: the fp32 norm is clamped at 1e-12


@triton.jit
def _nmse_fwd_kernel(pred_ptr, target_ptr, out_ptr, n_rows, d, stride_p, stride_t,
                     scale_p, scale_t,
                     BLOCK_D: tl.constexpr, ROWS: tl.constexpr, ONE_TILE: tl.constexpr):
    row_R = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok_R1 = (row_R < n_rows)[:, None]
    p_ptr_R1 = pred_ptr + row_R[:, None] * stride_p
    t_ptr_R1 = target_ptr + row_R[:, None] * stride_t
    col_1B = tl.arange(0, BLOCK_D)[None, :]
    if ONE_TILE:
        mask_RB = row_ok_R1 & (col_1B < d)
        p_RB = tl.load(p_ptr_R1 + col_1B, mask=mask_RB, other=0.0).to(tl.float32)
        g_RB = tl.load(t_ptr_R1 + col_1B, mask=mask_RB, other=0.0).to(tl.float32)
        a_R = scale_p / tl.maximum(tl.sqrt(tl.sum(p_RB * p_RB, axis=1)), _EPS)
        b_R = scale_t / tl.maximum(tl.sqrt(tl.sum(g_RB * g_RB, axis=1)), _EPS)
        r_RB = p_RB * a_R[:, None] - g_RB * b_R[:, None]
        sq_R = tl.sum(r_RB * r_RB, axis=1)
    else:
        pp_RB = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
        gg_RB = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
        for start in range(0, d, BLOCK_D):
            mask_RB = row_ok_R1 & (col_1B + start < d)
            p_RB = tl.load(p_ptr_R1 + start + col_1B, mask=mask_RB, other=0.0).to(tl.float32)
            g_RB = tl.load(t_ptr_R1 + start + col_1B, mask=mask_RB, other=0.0).to(tl.float32)
            pp_RB += p_RB * p_RB
            gg_RB += g_RB * g_RB
        a_R = scale_p / tl.maximum(tl.sqrt(tl.sum(pp_RB, axis=1)), _EPS)
        b_R = scale_t / tl.maximum(tl.sqrt(tl.sum(gg_RB, axis=1)), _EPS)
        acc_RB = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
        for start in range(0, d, BLOCK_D):
            mask_RB = row_ok_R1 & (col_1B + start < d)
            p_RB = tl.load(p_ptr_R1 + start + col_1B, mask=mask_RB, other=0.0).to(tl.float32)
            g_RB = tl.load(t_ptr_R1 + start + col_1B, mask=mask_RB, other=0.0).to(tl.float32)
            r_RB = p_RB * a_R[:, None] - g_RB * b_R[:, None]
            acc_RB += r_RB * r_RB
        sq_R = tl.sum(acc_RB, axis=1)
    tl.store(out_ptr + row_R, sq_R / d, mask=row_R < n_rows)


@triton.jit
def _nmse_bwd_kernel(pred_ptr, target_ptr, gout_ptr, gpred_ptr, gtarget_ptr, n_rows, d,
                     stride_p, stride_t, scale_p, scale_t,
                     BLOCK_D: tl.constexpr, ROWS: tl.constexpr, ONE_TILE: tl.constexpr,
                     GRAD_PRED: tl.constexpr, GRAD_TARGET: tl.constexpr):
    # mse = |P - G|^2 / d with P = a p, a = s_p / max(|p|, eps). d mse / dp = c a (r - P (P.r) / s_p^2)
    # with r = P - G and c = 2 gout / d; the projection term drops out where the norm was clamped.
    row_R = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok_R1 = (row_R < n_rows)[:, None]
    p_ptr_R1 = pred_ptr + row_R[:, None] * stride_p
    t_ptr_R1 = target_ptr + row_R[:, None] * stride_t
    gp_ptr_R1 = gpred_ptr + row_R[:, None] * d
    gt_ptr_R1 = gtarget_ptr + row_R[:, None] * d
    col_1B = tl.arange(0, BLOCK_D)[None, :]
    c_R = 2.0 * tl.load(gout_ptr + row_R, mask=row_R < n_rows, other=0.0).to(tl.float32) / d
    if ONE_TILE:
        mask_RB = row_ok_R1 & (col_1B < d)
        p_RB = tl.load(p_ptr_R1 + col_1B, mask=mask_RB, other=0.0).to(tl.float32)
        g_RB = tl.load(t_ptr_R1 + col_1B, mask=mask_RB, other=0.0).to(tl.float32)
        np_R = tl.sqrt(tl.sum(p_RB * p_RB, axis=1))
        ng_R = tl.sqrt(tl.sum(g_RB * g_RB, axis=1))
        a_R = scale_p / tl.maximum(np_R, _EPS)
        b_R = scale_t / tl.maximum(ng_R, _EPS)
        P_RB = p_RB * a_R[:, None]
        G_RB = g_RB * b_R[:, None]
        r_RB = P_RB - G_RB
        kp_R = tl.where(np_R >= _EPS, tl.sum(P_RB * r_RB, axis=1) / (scale_p * scale_p), 0.0)
        kg_R = tl.where(ng_R >= _EPS, tl.sum(G_RB * r_RB, axis=1) / (scale_t * scale_t), 0.0)
        if GRAD_PRED:
            gp_RB = (c_R * a_R)[:, None] * (r_RB - P_RB * kp_R[:, None])
            tl.store(gp_ptr_R1 + col_1B, gp_RB.to(gpred_ptr.dtype.element_ty), mask=mask_RB)
        if GRAD_TARGET:
            gt_RB = (c_R * b_R)[:, None] * (G_RB * kg_R[:, None] - r_RB)
            tl.store(gt_ptr_R1 + col_1B, gt_RB.to(gtarget_ptr.dtype.element_ty), mask=mask_RB)
    else:
        pp_RB = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
        gg_RB = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
        for start in range(0, d, BLOCK_D):
            mask_RB = row_ok_R1 & (col_1B + start < d)
            p_RB = tl.load(p_ptr_R1 + start + col_1B, mask=mask_RB, other=0.0).to(tl.float32)
            g_RB = tl.load(t_ptr_R1 + start + col_1B, mask=mask_RB, other=0.0).to(tl.float32)
            pp_RB += p_RB * p_RB
            gg_RB += g_RB * g_RB
        np_R = tl.sqrt(tl.sum(pp_RB, axis=1))
        ng_R = tl.sqrt(tl.sum(gg_RB, axis=1))
        a_R = scale_p / tl.maximum(np_R, _EPS)
        b_R = scale_t / tl.maximum(ng_R, _EPS)
        pr_RB = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
        gr_RB = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
        for start in range(0, d, BLOCK_D):
            mask_RB = row_ok_R1 & (col_1B + start < d)
            p_RB = tl.load(p_ptr_R1 + start + col_1B, mask=mask_RB, other=0.0).to(tl.float32)
            g_RB = tl.load(t_ptr_R1 + start + col_1B, mask=mask_RB, other=0.0).to(tl.float32)
            P_RB = p_RB * a_R[:, None]
            G_RB = g_RB * b_R[:, None]
            pr_RB += P_RB * (P_RB - G_RB)
            gr_RB += G_RB * (P_RB - G_RB)
        kp_R = tl.where(np_R >= _EPS, tl.sum(pr_RB, axis=1) / (scale_p * scale_p), 0.0)
        kg_R = tl.where(ng_R >= _EPS, tl.sum(gr_RB, axis=1) / (scale_t * scale_t), 0.0)
        for start in range(0, d, BLOCK_D):
            mask_RB = row_ok_R1 & (col_1B + start < d)
            p_RB = tl.load(p_ptr_R1 + start + col_1B, mask=mask_RB, other=0.0).to(tl.float32)
            g_RB = tl.load(t_ptr_R1 + start + col_1B, mask=mask_RB, other=0.0).to(tl.float32)
            P_RB = p_RB * a_R[:, None]
            G_RB = g_RB * b_R[:, None]
            r_RB = P_RB - G_RB
            if GRAD_PRED:
                gp_RB = (c_R * a_R)[:, None] * (r_RB - P_RB * kp_R[:, None])
                tl.store(gp_ptr_R1 + start + col_1B, gp_RB.to(gpred_ptr.dtype.element_ty),
                         mask=mask_RB)
            if GRAD_TARGET:
                gt_RB = (c_R * b_R)[:, None] * (G_RB * kg_R[:, None] - r_RB)
                tl.store(gt_ptr_R1 + start + col_1B, gt_RB.to(gtarget_ptr.dtype.element_ty),
                         mask=mask_RB)


@dataclass(frozen=True, slots=True)
class NMSEConfig:
    """Launch shape. None fields are chosen from D; the benchmark sweeps the others."""

    block_d: int | None = None
    """Tile width along D (a power of two). None: the whole row, up to `max_tile`."""
    rows: int = 1
    """Rows per program (a power of two)."""
    num_warps: int | None = None
    """Warps per program. None: one warp per 512 tile elements, between 4 and 8 (the best of
    4/8/16 on an H100 for D = 3584 and 8192 forward and backward, docs/benchmarks.md)."""
    max_tile: int = 8192
    """Widest row kept whole in registers when block_d is None."""


def _launch_shape(d: int, cfg: NMSEConfig) -> tuple[int, bool, int]:
    block_d = cfg.block_d or min(next_power_of_2(d), cfg.max_tile)
    num_warps = cfg.num_warps or min(8, max(4, block_d * cfg.rows // 512))
    return block_d, block_d >= d, num_warps


def _rowmajor(x_ND: torch.Tensor) -> torch.Tensor:
    return x_ND if x_ND.stride(-1) == 1 else x_ND.contiguous()


def nmse_forward(pred_ND: torch.Tensor, target_ND: torch.Tensor, scale_p: float, scale_t: float,
                 cfg: NMSEConfig = NMSEConfig()) -> torch.Tensor:
    """Per-row normalised MSE, fp32 [N]. Inputs are [N, D] on one device, any float dtype."""
    pred_ND, target_ND = _rowmajor(pred_ND), _rowmajor(target_ND)
    n, d = pred_ND.shape
    out_N = torch.empty(n, dtype=torch.float32, device=pred_ND.device)
    if n == 0:
        return out_N
    block_d, one_tile, num_warps = _launch_shape(d, cfg)
    grid = (_cdiv(n, cfg.rows),)
    _nmse_fwd_kernel[grid](pred_ND, target_ND, out_N, n, d, pred_ND.stride(0),
                           target_ND.stride(0), float(scale_p), float(scale_t), BLOCK_D=block_d,
                           ROWS=cfg.rows, ONE_TILE=one_tile, num_warps=num_warps)
    return out_N


def nmse_backward(pred_ND: torch.Tensor, target_ND: torch.Tensor, gout_N: torch.Tensor,
                  scale_p: float, scale_t: float, need_pred: bool = True,
                  need_target: bool = False, cfg: NMSEConfig = NMSEConfig()
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of sum_n gout[n] * mse[n] with respect to pred and target, in their dtypes."""
    pred_ND, target_ND = _rowmajor(pred_ND), _rowmajor(target_ND)
    n, d = pred_ND.shape
    gout_N = gout_N.contiguous()
    gp_ND = torch.empty(n, d, dtype=pred_ND.dtype, device=pred_ND.device) if need_pred else None
    gt_ND = torch.empty(n, d, dtype=target_ND.dtype, device=pred_ND.device) if need_target else None
    if n == 0 or not (need_pred or need_target):
        return gp_ND, gt_ND
    block_d, one_tile, num_warps = _launch_shape(d, cfg)
    grid = (_cdiv(n, cfg.rows),)
    _nmse_bwd_kernel[grid](pred_ND, target_ND, gout_N,
                           gp_ND if need_pred else pred_ND, gt_ND if need_target else target_ND,
                           n, d, pred_ND.stride(0), target_ND.stride(0), float(scale_p),
                           float(scale_t), BLOCK_D=block_d, ROWS=cfg.rows, ONE_TILE=one_tile,
                           GRAD_PRED=need_pred, GRAD_TARGET=need_target, num_warps=num_warps)
    return gp_ND, gt_ND


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
