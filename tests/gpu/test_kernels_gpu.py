"""The compiled Triton kernels on a CUDA device against float64 references (CPU CI skips these; the
interpreted kernels are checked in tests/kernels). Legend: N rows, D width, T tokens, V vocab."""

from __future__ import annotations

import os

import pytest
import torch

from nla_mcore.kernels.logprob import vocab_parallel_logprobs
from nla_mcore.kernels.nmse import normalized_mse, normalized_mse_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# Same tolerances as tests/kernels, for the same reasons: fp32 math (1e-5 on results and fp32
# gradients), gradients rounded to bf16 (1e-2). exp is ex2.approx on the GPU (~2 ulp): inside 1e-5.
OUT_TOL = 1e-5
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture
def rng():
    """A fresh seed each run; failures print it."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "non-finite values in the output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def nmse_float64(pred_ND, target_ND, w_N):
    p_ND = pred_ND.double().cpu().requires_grad_()
    g_ND = target_ND.double().cpu().requires_grad_()
    mse_N = normalized_mse_reference(p_ND, g_ND)
    gp_ND, gt_ND = torch.autograd.grad((mse_N * w_N.double().cpu()).sum(), (p_ND, g_ND))
    return mse_N.detach(), gp_ND, gt_ND


def nmse_cuda(pred_ND, target_ND, w_N):
    p_ND = pred_ND.cuda().requires_grad_()
    g_ND = target_ND.cuda().requires_grad_()
    mse_N = normalized_mse(p_ND, g_ND)  # "auto" must pick Triton for CUDA tensors
    (mse_N * w_N.cuda()).sum().backward()
    torch.cuda.synchronize()
    return mse_N.detach(), p_ND.grad, g_ND.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [37, 3584, 3840, 5376, 8192, 12289])
def test_nmse_matches_float64(rng, dtype, d):
    """Real widths (3584 Qwen, 3840 and 5376 Gemma, 8192 Llama-70B), an odd one, and 12289 (wider
    than a register tile: the looped path), with a zero pred row, a zero target row and rows of
    norm 7.4e4 and 1e10; ordinary and clamped rows compared separately (their gradients differ by
    ~1e12). Tolerances: top of file."""
    n = 64
    pred_ND = torch.randn(n, d, generator=rng, dtype=torch.float64)
    target_ND = torch.randn(n, d, generator=rng, dtype=torch.float64)
    pred_ND[3] *= 7.4e4 / pred_ND[3].norm()
    target_ND[4] *= 1e10 / target_ND[4].norm()
    pred_ND[1], target_ND[2] = 0, 0
    pred_ND, target_ND = pred_ND.to(dtype), target_ND.to(dtype)
    w_N = torch.randn(n, generator=rng)
    ref, out = nmse_float64(pred_ND, target_ND, w_N), nmse_cuda(pred_ND, target_ND, w_N)
    seed = rng.initial_seed()
    assert rel_err(out[0], ref[0]) < OUT_TOL, seed
    for k, dead in ((1, 1), (2, 2)):
        live_N = torch.ones(n, dtype=torch.bool)
        live_N[dead] = False
        assert rel_err(out[k][live_N], ref[k][live_N]) < GRAD_TOL[dtype], (k, seed)
        assert rel_err(out[k][dead], ref[k][dead]) < GRAD_TOL[dtype], (k, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_match_float64(rng, dtype):
    """Log-probs, entropies and the gradient of a random combination of both on CUDA against
    float64 log-softmax, for a half-vocab shard of Qwen's width (76032 columns, offset 76032, so
    about half the targets lie elsewhere), temperature 0.7, T = 37 in chunks of 16."""
    t, v, start, temperature = 37, 76032, 76032, 0.7
    x_TV = (4 * torch.randn(t, v, generator=rng)).to(dtype)
    target_T = torch.randint(0, 2 * v, (t,), generator=rng)
    w_lp_T, w_ent_T = torch.randn(t, generator=rng), torch.randn(t, generator=rng)
    # float64 reference on the shard: partial results as the kernels define them (no all-reduce)
    x64_TV = x_TV.double().requires_grad_()
    z_TV = x64_TV / temperature
    lse_T = torch.logsumexp(z_TV, dim=-1)
    local_T = target_T - start
    in_shard_T = (local_T >= 0) & (local_T < v)
    zt_T = torch.where(in_shard_T, z_TV.gather(1, local_T.clamp(0, v - 1)[:, None])[:, 0], 0.0)
    logp_T = zt_T - lse_T
    p_TV = torch.softmax(z_TV, dim=-1)
    ent_T = lse_T - (p_TV * z_TV).sum(-1)
    loss = (logp_T * w_lp_T.double()).sum() + (ent_T * w_ent_T.double()).sum()
    (grad_TV,) = torch.autograd.grad(loss, x64_TV)

    xc_TV = x_TV.cuda().requires_grad_()
    lp_T, h_T = vocab_parallel_logprobs(
        xc_TV,
        target_T.cuda(),
        temperature=temperature,
        vocab_start_index=start,
        with_entropy=True,
        chunk_size=16,
    )
    ((lp_T * w_lp_T.cuda()).sum() + (h_T * w_ent_T.cuda()).sum()).backward()
    seed = rng.initial_seed()
    assert rel_err(lp_T, logp_T) < OUT_TOL, seed
    assert rel_err(h_T, ent_T) < OUT_TOL, seed
    assert rel_err(xc_TV.grad, grad_TV) < GRAD_TOL[dtype], seed


def test_logprobs_triton_equals_torch_backend(rng):
    """Both backends on the same CUDA bf16 logits: same log-probs (fp32: 1e-5) and gradients
    (bf16 rounding of nearly equal values: at most one step, 4e-3)."""
    x_TV = (4 * torch.randn(64, 152064, generator=rng)).bfloat16().cuda()
    target_T = torch.randint(0, 152064, (64,), generator=rng).cuda()
    outs = []
    for backend in ("torch", "triton"):
        xx_TV = x_TV.clone().requires_grad_()
        lp_T = vocab_parallel_logprobs(xx_TV, target_T, backend=backend)
        lp_T.sum().backward()
        outs.append((lp_T.detach(), xx_TV.grad))
    assert rel_err(outs[1][0], outs[0][0]) < 1e-5, rng.initial_seed()
    assert rel_err(outs[1][1], outs[0][1]) < 4e-3, rng.initial_seed()
