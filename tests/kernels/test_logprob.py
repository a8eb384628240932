"""Per-token log-probs over vocab-parallel logits: the PyTorch backend against float64
log-softmax and gradcheck, the Triton kernels (interpreted) against float64, and TP = 2 under gloo
against the single-rank result and Megatron-Core's `vocab_parallel_cross_entropy`.
Legend: T tokens, V vocab (local shard width where it says so)."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch

from nla_mcore.kernels.logprob import vocab_parallel_logprobs

# Relative error ‖out − ref‖ / ‖ref‖ against float64 on the same (rounded) logits. The kernels
# compute in fp32 (~1e-7 rounding; exp via ex2.approx on the GPU, ~2 ulp), so 1e-5 for log-probs
# and entropies. Gradients are stored in the logits' dtype: 1e-5 in fp32; bf16 keeps 8 significant
# bits (≤ 2^-8 ≈ 4e-3 relative per element, twice that if the interpreter truncates), so 1e-2.
OUT_TOL = 1e-5
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite values in the output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def random_logits(t: int, v: int, dtype: torch.dtype, rng: torch.Generator) -> torch.Tensor:
    """Logits with a realistic spread (std 4) and a few -inf entries (masked padding columns)."""
    x_TV = 4 * torch.randn(t, v, generator=rng, dtype=torch.float64)
    x_TV[0, -3:] = float("-inf")
    return x_TV.to(dtype)


def float64_reference(x_TV, target_T, temperature, w_lp_T, w_ent_T):
    """(logp, entropy, d(w_lp·logp + w_ent·H)/dlogits) from log_softmax in float64, full vocab."""
    x_TV = x_TV.double().requires_grad_()
    lsm_TV = torch.log_softmax(x_TV / temperature, dim=-1)
    logp_T = lsm_TV.gather(1, target_T[:, None]).squeeze(1)
    p_TV = lsm_TV.exp()
    ent_T = -(p_TV * lsm_TV.masked_fill(p_TV == 0, 0.0)).sum(-1)
    loss = (logp_T * w_lp_T.double()).sum() + (ent_T * w_ent_T.double()).sum()
    (grad_TV,) = torch.autograd.grad(loss, x_TV)
    return logp_T.detach(), ent_T.detach(), grad_TV


def ours(x_TV, target_T, temperature, w_lp_T, w_ent_T, **kw):
    """(logp, entropy, gradient) from vocab_parallel_logprobs with the same weights."""
    x_TV = x_TV.clone().requires_grad_()
    logp_T, ent_T = vocab_parallel_logprobs(x_TV, target_T, temperature=temperature,
                                            with_entropy=True, **kw)
    ((logp_T * w_lp_T).sum() + (ent_T * w_ent_T).sum()).backward()
    return logp_T.detach(), ent_T.detach(), x_TV.grad


def check_against_float64(dtype, rng, backend, t=9, v=1000, chunk_size=4, temperature=0.7):
    x_TV = random_logits(t, v, dtype, rng)
    target_T = torch.randint(0, v - 3, (t,), generator=rng)
    w_lp_T, w_ent_T = torch.randn(t, generator=rng), torch.randn(t, generator=rng)
    ref = float64_reference(x_TV, target_T, temperature, w_lp_T, w_ent_T)
    out = ours(x_TV, target_T, temperature, w_lp_T, w_ent_T, chunk_size=chunk_size,
               backend=backend)
    seed = rng.initial_seed()
    assert out[0].dtype == torch.float32 and out[2].dtype == dtype
    assert rel_err(out[0], ref[0]) < OUT_TOL, ("logp", rel_err(out[0], ref[0]), seed)
    assert rel_err(out[1], ref[1]) < OUT_TOL, ("entropy", rel_err(out[1], ref[1]), seed)
    assert rel_err(out[2], ref[2]) < GRAD_TOL[dtype], ("grad", rel_err(out[2], ref[2]), seed)


# --- the PyTorch backend ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_matches_float64(rng, dtype):
    """The CPU path (what GRPO runs in CI and the CPU functional mode) against float64
    log-softmax: log-probs, entropies and the gradient of a random combination of both, with a
    temperature, -inf logits, and T = 9 in chunks of 4 (a ragged last chunk). Tolerances: top."""
    check_against_float64(dtype, rng, "torch")


def test_torch_backend_gradcheck(rng):
    """The hand-written backward (softmax recomputed from the saved logits) must be the true
    gradient: finite differences in float64 with gradcheck's tolerances, entropy included, with
    the target of one token outside this shard (vocab_start_index = 2)."""
    x_TV = torch.randn(5, 7, generator=rng, dtype=torch.float64, requires_grad=True)
    target_T = torch.tensor([2, 8, 5, 3, 0])  # ids 8 and 0 are outside [2, 9)

    def fn(x):
        return vocab_parallel_logprobs(x, target_T, temperature=1.3, vocab_start_index=2,
                                       with_entropy=True, chunk_size=2, backend="torch")

    assert torch.autograd.gradcheck(fn, (x_TV,)), rng.initial_seed()


def test_target_outside_shard_contributes_nothing():
    """Without a group, a target outside [start, start + V) has no logit here, so logp = -lse and
    its gradient is -softmax (the rank that owns it adds the 1 after the all-reduce)."""
    x_TV = torch.tensor([[0.0, 0.0]], requires_grad=True)
    logp_T = vocab_parallel_logprobs(x_TV, torch.tensor([5]), vocab_start_index=0)
    logp_T.sum().backward()
    assert torch.allclose(logp_T, -torch.log(torch.tensor([2.0])))
    assert torch.allclose(x_TV.grad, torch.tensor([[-0.5, -0.5]]))


def test_bad_inputs_name_the_problem():
    """Shape errors name both shapes; float targets and non-positive temperatures are refused."""
    with pytest.raises(ValueError, match=r"\(4, 10\).*\(3,\)"):
        vocab_parallel_logprobs(torch.zeros(4, 10), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        vocab_parallel_logprobs(torch.zeros(4, 10), torch.zeros(4))
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs(torch.zeros(4, 10), torch.zeros(4, dtype=torch.long),
                                temperature=0.0)


# --- the Triton kernels, interpreted ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v", [1000, 4099])
def test_triton_matches_float64(triton_interpreter, rng, dtype, v):
    """The stats and gradient kernels against float64 log-softmax (tolerances: top): V = 1000
    fits one 4096-wide tile, V = 4099 takes the online-softmax loop with a 3-wide last tile."""
    from ._interpreter_probe import skip_unless_interpreter_runs_loops

    skip_unless_interpreter_runs_loops()
    check_against_float64(dtype, rng, "triton", t=5, v=v, chunk_size=3)


def test_triton_matches_torch_on_a_shard(triton_interpreter, rng):
    """On a shard with an offset (vocab_start_index = 300, some targets elsewhere) both backends
    must agree on the partial results and gradients (fp32: 1e-5)."""
    from ._interpreter_probe import skip_unless_interpreter_runs_loops

    skip_unless_interpreter_runs_loops()
    x_TV = random_logits(6, 500, torch.float32, rng)
    target_T = torch.randint(0, 1000, (6,), generator=rng)
    target_T[:2] = torch.tensor([300, 799])  # the first and last column of the shard
    w = torch.randn(6, generator=rng), torch.randn(6, generator=rng)
    kw = dict(vocab_start_index=300)
    a = ours(x_TV, target_T, 1.0, *w, backend="torch", **kw)
    b = ours(x_TV, target_T, 1.0, *w, backend="triton", **kw)
    for name, x, y in zip(("logp", "entropy", "grad"), a, b, strict=True):
        assert rel_err(y, x) < 1e-5, (name, rng.initial_seed())


# --- tensor parallel under gloo -----------------------------------------------------------------


def _tp2_worker(rank: int, port: int, seed: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backends = ["torch"]
    if "triton.language" not in sys.modules and _has_triton():
        os.environ["TRITON_INTERPRET"] = "1"  # before Megatron-Core imports Triton
        from ._interpreter_probe import interpreter_runs_runtime_loops

        if interpreter_runs_runtime_loops():
            backends.append("triton")
    import torch.distributed as dist
    from megatron.core import parallel_state

    dist.init_process_group("gloo", rank=rank, world_size=2)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    try:
        group = parallel_state.get_tensor_model_parallel_group()
        for backend in backends:
            _check_tp2_rank(rank, group, seed, backend)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _check_tp2_rank(rank, group, seed, backend):
    from nla_mcore.kernels.logprob import megatron_reference_logprobs

    rng = torch.Generator().manual_seed(seed)
    t, v, temperature = 11, 1000, 0.8
    x_TV = random_logits(t, v, torch.bfloat16, rng)
    target_T = torch.randint(0, v - 3, (t,), generator=rng)
    w_lp_T, w_ent_T = torch.randn(t, generator=rng), torch.randn(t, generator=rng)
    cols = slice(rank * v // 2, (rank + 1) * v // 2)
    full = ours(x_TV, target_T, temperature, w_lp_T, w_ent_T, backend=backend, chunk_size=4)
    shard = ours(x_TV[:, cols], target_T, temperature, w_lp_T, w_ent_T, backend=backend,
                 chunk_size=4, tp_group=group)
    megatron_T = megatron_reference_logprobs(x_TV[:, cols], target_T, temperature)
    where = f"rank {rank}, backend {backend}, seed {seed}"
    assert rel_err(shard[0], full[0]) < 1e-5, f"logp vs single rank, {where}"
    assert rel_err(shard[1], full[1]) < 1e-5, f"entropy vs single rank, {where}"
    assert rel_err(shard[2], full[2][:, cols]) < 4e-3, f"grad vs single rank, {where}"
    assert rel_err(shard[0], megatron_T) < 1e-5, f"logp vs Megatron-Core, {where}"


def test_tp2_gloo_equals_single_rank(rng):
    """The all-reduce combination (one MAX of the per-rank maxima, one SUM of the rescaled sums
    and the target logit) must reproduce the unsplit vocab: 2 gloo ranks with TP = 2 and
    half the vocab each against the single-rank result on the full logits, and against
    Megatron-Core's vocab_parallel_cross_entropy on an fp32 copy divided by the temperature (its
    reference), for the PyTorch backend and the interpreted Triton kernels (where the installed
    interpreter can run them, see _interpreter_probe.py). Log-probs and
    entropies differ only by fp32 summation order (1e-5); bf16 gradients by at most one bf16
    rounding step per element (4e-3)."""
    torch_mp = pytest.importorskip("torch.multiprocessing")
    pytest.importorskip("megatron.core")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch_mp.spawn(_tp2_worker, args=(port, rng.initial_seed()), nprocs=2)
