"""Normalised MSE between predicted and target vectors: the AR loss, the RL reward and FVE's numerator.

Legend: N rows (vectors), D the vector width.

`mse_nrm[n] = mean_d (normalize(pred[n], s_p) - normalize(target[n], s_t))^2`, with
`normalize(v, s) = v / (max(|v|_2, 1e-12) / s)` computed in fp32 (NLA.md, "Vectors") and s = sqrt(D)
by default, which makes it `2 (1 - cos)` in [0, 4].

Design decision: PyTorch computes this in about eight passes over [N, D] (upcast, two norms, two
divisions, difference, square, mean), and as many again backward. The Triton path reads each row of
pred and target once forward and once backward (`_nmse_triton.py`), keeping the row in registers, and
writes only the [N] result or the gradient. Trade-off: forward saves nothing but the inputs, so the
backward re-reads them (5 N D element-bytes for forward + backward instead of the 3 a fused
loss-and-grad would need); in exchange the forward works unchanged when no gradient is wanted (the
reward) and nothing [N, D]-sized is kept alive between forward and backward.

Backends: "auto" runs Triton on CUDA tensors and the PyTorch reference otherwise; "triton" forces the
kernel, which on CPU tensors runs in Triton's interpreter and so needs the process started with
`TRITON_INTERPRET=1` (the tests do this in a subprocess, see `_triton.py`); "torch" always runs
the reference.

Call sites (ready; they pass their tensors and scales in): the AR regression loss and FVE in
`nla_mcore.models` / `nla_mcore.eval`, and the RL reward `-mse_nrm` in `nla_mcore.rl`.
"""

from __future__ import annotations

import math

import torch

from ._triton import resolve_backend

EPS = 1e-12
_FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def normalize(v_ND: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """`v / (max(|v|_2, 1e-12) / scale)` along the last dim, in fp32 (fp64 stays fp64).

    scale None means unit norm (NLA.md); the result is in the accumulation dtype, not v's.
    """
    v_ND = v_ND.to(torch.promote_types(v_ND.dtype, torch.float32))
    norm_N1 = torch.linalg.vector_norm(v_ND, dim=-1, keepdim=True).clamp_min(EPS)
    return v_ND / norm_N1 if scale is None else v_ND / (norm_N1 / scale)


def normalized_mse_reference(pred_ND: torch.Tensor, target_ND: torch.Tensor, *,
                             pred_scale: float | None = None,
                             target_scale: float | None = None) -> torch.Tensor:
    """PyTorch reference of `normalized_mse` (autograd does the backward); fp32, or fp64 for fp64."""
    _check_inputs(pred_ND, target_ND)
    d = pred_ND.shape[-1]
    p_ND = normalize(pred_ND, math.sqrt(d) if pred_scale is None else pred_scale)
    g_ND = normalize(target_ND, math.sqrt(d) if target_scale is None else target_scale)
    return (p_ND - g_ND).square().mean(dim=-1)


def normalized_mse(pred_ND: torch.Tensor, target_ND: torch.Tensor, *,
                   pred_scale: float | None = None, target_scale: float | None = None,
                   backend: str = "auto") -> torch.Tensor:
    """Per-row normalised MSE `mse_N` (fp32), differentiable in pred and target.

    pred_ND, target_ND: [N, D], same shape and device, bf16/fp16/fp32/fp64 (may differ).
    pred_scale, target_scale: the norms both are rescaled to before the MSE; None means sqrt(D).
    backend: "auto" (Triton on CUDA, PyTorch otherwise), "triton" (on CPU: needs
        TRITON_INTERPRET=1 from process start) or "torch".
    """
    _check_inputs(pred_ND, target_ND)
    d = pred_ND.shape[-1]
    s_p = _check_scale(math.sqrt(d) if pred_scale is None else pred_scale, "pred_scale")
    s_t = _check_scale(math.sqrt(d) if target_scale is None else target_scale, "target_scale")
    if resolve_backend(backend, pred_ND) == "torch":
        return normalized_mse_reference(pred_ND, target_ND, pred_scale=s_p, target_scale=s_t)
    return _NormalizedMSE.apply(pred_ND, target_ND, s_p, s_t)


class _NormalizedMSE(torch.autograd.Function):
    """Triton forward (one pass, saves only the inputs) and backward (one pass, both gradients)."""

    @staticmethod
    def forward(ctx, pred_ND, target_ND, s_p, s_t):
        from ._nmse_triton import nmse_forward

        ctx.save_for_backward(pred_ND, target_ND)
        ctx.scales = (s_p, s_t)
        return nmse_forward(pred_ND, target_ND, s_p, s_t)

    @staticmethod
    def backward(ctx, gout_N):
        from ._nmse_triton import nmse_backward

        pred_ND, target_ND = ctx.saved_tensors
        need_p, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gp_ND, gt_ND = nmse_backward(pred_ND, target_ND, gout_N, *ctx.scales,
                                     need_pred=need_p, need_target=need_t)
        return gp_ND, gt_ND, None, None


def _check_inputs(pred_ND: torch.Tensor, target_ND: torch.Tensor) -> None:
    if pred_ND.dim() != 2 or pred_ND.shape != target_ND.shape:
        raise ValueError("pred and target must both be [N, D]; got "
                         f"pred {tuple(pred_ND.shape)} and target {tuple(target_ND.shape)}")
    if pred_ND.device != target_ND.device:
        raise ValueError(f"pred is on {pred_ND.device} but target is on {target_ND.device}")
    for name, x in (("pred", pred_ND), ("target", target_ND)):
        if x.dtype not in _FLOATS:
            raise TypeError(f"{name} must be one of {_FLOATS}, got {x.dtype}")
    if pred_ND.shape[1] == 0:
        raise ValueError("vectors of width 0 have no norm; got D = 0")


def _check_scale(scale: float, name: str) -> float:
    scale = float(scale)
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"{name} must be a positive finite number, got {scale}")
    return scale
