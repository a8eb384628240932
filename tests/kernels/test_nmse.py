"""Normalised MSE: the PyTorch reference against closed forms and gradcheck, the Triton kernel
(interpreted on CPU) against a float64 reference. Legend: N rows, D width."""

from __future__ import annotations

import math

import pytest
import torch

from nla_mcore.kernels.nmse import normalize, normalized_mse, normalized_mse_reference

# Relative error ‖out − ref‖ / ‖ref‖ allowed for the Triton path against float64 math on the same
# (already rounded) inputs. The kernel computes in fp32, whose rounding gives ~1e-7 here, so 1e-5
# leaves 100x headroom. Gradients are stored in the input dtype: bf16 keeps 8 significant bits, a
# relative rounding error of at most 2^-8 ≈ 4e-3 per element (twice that if truncated), so 1e-2.
FWD_TOL = 1e-5
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite values in the output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def vectors(n: int, d: int, dtype: torch.dtype, rng: torch.Generator) -> torch.Tensor:
    """Random rows with norms spread over three decades, like residual-stream activations."""
    x_ND = torch.randn(n, d, generator=rng, dtype=torch.float64)
    x_ND *= torch.exp(torch.empty(n, 1, dtype=torch.float64).uniform_(0, 7, generator=rng))
    return x_ND.to(dtype)


def float64_grads(pred_ND, target_ND, w_N, **scales):
    """(mse, d(w·mse)/dpred, d(w·mse)/dtarget) from the reference in float64."""
    p_ND = pred_ND.double().requires_grad_()
    g_ND = target_ND.double().requires_grad_()
    mse_N = normalized_mse_reference(p_ND, g_ND, **scales)
    gp_ND, gt_ND = torch.autograd.grad((mse_N * w_N.double()).sum(), (p_ND, g_ND))
    return mse_N.detach(), gp_ND, gt_ND


def triton_grads(pred_ND, target_ND, w_N, **scales):
    p_ND = pred_ND.clone().requires_grad_()
    g_ND = target_ND.clone().requires_grad_()
    mse_N = normalized_mse(p_ND, g_ND, backend="triton", **scales)
    (mse_N * w_N).sum().backward()
    return mse_N.detach(), p_ND.grad, g_ND.grad


# --- the PyTorch reference ------------------------------------------------------------------------


def test_reference_is_two_one_minus_cos(rng):
    """NLA.md defines mse_nrm with s = √D to equal 2(1 − cos), in [0, 4]; check against an
    independent cosine in float64 (only rounding differs: 1e-12), and the orthogonal case = 2."""
    p_ND, g_ND = vectors(16, 37, torch.float64, rng), vectors(16, 37, torch.float64, rng)
    cos_N = torch.nn.functional.cosine_similarity(p_ND, g_ND, dim=-1)
    assert rel_err(normalized_mse_reference(p_ND, g_ND), 2 * (1 - cos_N)) < 1e-12, rng.initial_seed()
    e_2D = torch.eye(2, 8, dtype=torch.float64)
    ortho = normalized_mse_reference(e_2D[:1], e_2D[1:])
    assert torch.allclose(ortho, torch.tensor([2.0], dtype=torch.float64))


def test_normalize_follows_nla_md():
    """normalize(v, s) = v / (max(‖v‖, 1e-12) / s); s = None is unit norm; a zero row stays zero
    (no NaN) because of the clamp."""
    v_ND = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert torch.allclose(normalize(v_ND, 10.0), torch.tensor([[6.0, 8.0], [0.0, 0.0]]))
    assert torch.allclose(normalize(v_ND), torch.tensor([[0.6, 0.8], [0.0, 0.0]]))
    assert normalize(v_ND.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize("d", [1, 5, 13])
def test_reference_gradcheck(rng, d):
    """The Triton backward is checked against the reference's autograd gradients, so the reference
    must itself be right: finite differences in float64 (gradcheck's own tolerances), for odd
    widths, unequal custom scales, and d = 1 where normalisation leaves only the sign."""
    p_ND = vectors(4, d, torch.float64, rng).requires_grad_()
    g_ND = vectors(4, d, torch.float64, rng).requires_grad_()
    fn = lambda p, g: normalized_mse_reference(p, g, pred_scale=1.7, target_scale=0.3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (p_ND, g_ND)), rng.initial_seed()
    assert torch.autograd.gradcheck(normalized_mse_reference, (p_ND, g_ND)), rng.initial_seed()


def test_reference_zero_rows_are_finite():
    """A zero vector (an empty or failed prediction) must give a finite loss and gradient: with the
    1e-12 clamp it normalises to 0, so the MSE is the other side's mean square, s²/D = 1."""
    p_ND = torch.zeros(2, 6, dtype=torch.float64, requires_grad=True)
    g_ND = torch.tensor([[1.0] * 6, [0.0] * 6], dtype=torch.float64)
    mse_N = normalized_mse(p_ND, g_ND)
    mse_N.sum().backward()
    assert torch.allclose(mse_N, torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert torch.isfinite(p_ND.grad).all()


def test_auto_backend_on_cpu_is_the_reference(rng):
    """On CPU tensors "auto" must not need Triton (CI has no GPU): it is the reference, exactly."""
    p_ND, g_ND = vectors(3, 10, torch.bfloat16, rng), vectors(3, 10, torch.bfloat16, rng)
    assert torch.equal(normalized_mse(p_ND, g_ND), normalized_mse_reference(p_ND, g_ND))


def test_bad_inputs_name_the_problem():
    """Errors must say what is wrong: mismatched shapes name both shapes; bad backends and
    scales are refused."""
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        normalized_mse(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="backend"):
        normalized_mse(torch.ones(2, 3), torch.ones(2, 3), backend="cuda")
    with pytest.raises(ValueError, match="pred_scale"):
        normalized_mse(torch.ones(2, 3), torch.ones(2, 3), pred_scale=0.0)
    with pytest.raises(TypeError, match="int64"):
        normalized_mse(torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3))


def test_triton_on_cpu_without_interpreter_is_refused():
    """Without TRITON_INTERPRET=1 a CPU tensor cannot reach a Triton kernel: say how to fix it."""
    pytest.importorskip("triton")
    from nla_mcore.kernels._triton import interpreting

    if interpreting():
        pytest.skip("this process interprets")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        normalized_mse(torch.ones(2, 3), torch.ones(2, 3), backend="triton")


# --- the Triton kernel, interpreted ---------------------------------------------------------------


def assert_close_by_row_kind(out, ref, tol, dead_N, what, seed, live=True):
    """Rows with a clamped (zero) norm have gradients ~1e12 times larger than the others, so they
    are compared on their own: otherwise they would hide any error in the ordinary rows."""
    for rows in (~dead_N, dead_N) if live else (dead_N,):
        if rows.any() and ref[rows].norm() > 0:
            err = rel_err(out[rows], ref[rows])
            assert err < tol, f"{what}: rel. error {err:.2e} >= {tol:.0e} (seed {seed})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [1, 37, 300, 1024])
def test_triton_matches_float64(triton_interpreter, rng, dtype, d):
    """The kernel's forward and both gradients against the float64 reference on the same rounded
    inputs, for odd and power-of-two widths, with a zero pred row, a zero target row and a row of
    Gemma-like norm (7.4e4), under a random per-row upstream gradient (tolerances: see top).
    At D = 1 normalising leaves only the sign, so ordinary rows have a zero gradient (the
    reference's is rounding noise) and only the clamped rows' gradients are compared."""
    n = 7
    pred_ND, target_ND = vectors(n, d, dtype, rng), vectors(n, d, dtype, rng)
    pred_ND[1] = 0
    target_ND[2] = 0
    pred_ND[3] = (pred_ND[3].double() * 7.4e4 / pred_ND[3].double().norm()).to(dtype)
    w_N = torch.randn(n, generator=rng)
    ref = float64_grads(pred_ND, target_ND, w_N)
    out = triton_grads(pred_ND, target_ND, w_N)
    seed = rng.initial_seed()
    assert out[0].dtype == torch.float32 and out[1].dtype == dtype
    assert rel_err(out[0], ref[0]) < FWD_TOL, (rel_err(out[0], ref[0]), seed)
    dead_pred_N = pred_ND.double().norm(dim=1) < 1e-12
    dead_target_N = target_ND.double().norm(dim=1) < 1e-12
    assert_close_by_row_kind(out[1], ref[1], GRAD_TOL[dtype], dead_pred_N, "d/dpred", seed,
                             live=d > 1)
    assert_close_by_row_kind(out[2], ref[2], GRAD_TOL[dtype], dead_target_N, "d/dtarget", seed,
                             live=d > 1)


@pytest.mark.parametrize("block_d,rows", [(64, 1), (128, 2), (512, 4)])
def test_triton_tiled_rows_match_float64(triton_interpreter, rng, block_d, rows):
    """Rows wider than a tile take the looped path (two passes forward, three backward) and several
    rows per program mask a ragged last program; both must give the one-tile answer (fp32
    tolerances, see top). The widths 300 and N = 5 leave partial tiles and a partial row block."""
    from nla_mcore.kernels._nmse_triton import NMSEConfig, nmse_backward, nmse_forward

    from ._interpreter_probe import skip_unless_interpreter_runs_loops

    skip_unless_interpreter_runs_loops()
    pred_ND, target_ND = vectors(5, 300, torch.float32, rng), vectors(5, 300, torch.float32, rng)
    pred_ND[0] = 0
    w_N = torch.randn(5, generator=rng)
    cfg = NMSEConfig(block_d=block_d, rows=rows)
    s = math.sqrt(300)
    mse_N = nmse_forward(pred_ND, target_ND, s, 2.0, cfg)
    gp_ND, gt_ND = nmse_backward(pred_ND, target_ND, w_N, s, 2.0, True, True, cfg)
    ref = float64_grads(pred_ND, target_ND, w_N, target_scale=2.0)
    seed = rng.initial_seed()
    assert rel_err(mse_N, ref[0]) < FWD_TOL, seed
    dead_N = torch.arange(5) == 0
    assert_close_by_row_kind(gp_ND, ref[1], GRAD_TOL[torch.float32], dead_N, "d/dpred", seed)
    assert rel_err(gt_ND, ref[2]) < GRAD_TOL[torch.float32], seed


def test_triton_huge_norms_do_not_overflow(triton_interpreter, rng):
    """bf16 rows with norms from 7.4e4 (Gemma's residual stream) up to 1e15 (‖v‖² = 1e30, still
    finite in fp32) must give finite results equal to the float64 reference (tolerances: see top);
    the MSE stays in [0, 4] whatever the norm."""
    d = 3840
    pred_ND, target_ND = vectors(4, d, torch.float64, rng), vectors(4, d, torch.float64, rng)
    norms_N1 = torch.tensor([[7.4e4], [1e6], [1e10], [1e15]], dtype=torch.float64)
    pred_ND = (pred_ND / pred_ND.norm(dim=1, keepdim=True) * norms_N1).bfloat16()
    target_ND = (target_ND / target_ND.norm(dim=1, keepdim=True) * norms_N1.flip(0)).bfloat16()
    w_N = torch.ones(4)
    ref = float64_grads(pred_ND, target_ND, w_N)
    out = triton_grads(pred_ND, target_ND, w_N)
    assert ((out[0] >= 0) & (out[0] <= 4)).all()
    assert rel_err(out[0], ref[0]) < FWD_TOL, rng.initial_seed()
    # gradients scale as 1/‖v‖: compare row by row so the 7.4e4 row does not hide the others
    for i in range(4):
        assert rel_err(out[1][i], ref[1][i]) < GRAD_TOL[torch.bfloat16], (i, rng.initial_seed())


def test_triton_only_the_needed_gradient(triton_interpreter, rng):
    """When only the target needs a gradient (pred detached) the kernel must write only that one,
    and strided (non-contiguous) rows must be read through their row stride (fp32 tolerances)."""
    wide_ND = vectors(6, 80, torch.float32, rng)
    pred_ND = wide_ND[:, :50]  # row stride 80
    target_ND = vectors(6, 50, torch.float32, rng).requires_grad_()
    mse_N = normalized_mse(pred_ND, target_ND, backend="triton")
    mse_N.sum().backward()
    ref = float64_grads(pred_ND, target_ND.detach(), torch.ones(6))
    assert rel_err(mse_N.detach(), ref[0]) < FWD_TOL, rng.initial_seed()
    assert rel_err(target_ND.grad, ref[2]) < GRAD_TOL[torch.float32], rng.initial_seed()


def test_triton_empty_batch(triton_interpreter):
    """N = 0 (a step where no sample parsed) must return an empty result, not launch a kernel."""
    p_ND = torch.zeros(0, 8, requires_grad=True)
    mse_N = normalized_mse(p_ND, torch.zeros(0, 8), backend="triton")
    mse_N.sum().backward()
    assert mse_N.shape == (0,) and p_ND.grad.shape == (0, 8)
