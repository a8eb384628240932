"""Per-token log-probabilities (and entropy) from vocab-parallel logits, for GRPO.

Legend: T tokens, V the local vocab width (the full vocab / tp), C tokens in a chunk.

`logp[t] = z[t, target[t]] - logsumexp_v z[t, v]` with `z = logits / temperature` over the full
vocab, which is split across the tensor-parallel ranks; `entropy[t] = logsumexp z - E_p[z]`.

Design decision: the reference (Megatron-Core's `vocab_parallel_cross_entropy` on
`logits.float() / temperature`) materialises fp32 copies of the [T, V] logits (the copy, the
division, the softmax it saves, an fp32 gradient): 4-8 bytes per logit each, several times the bf16
logits themselves. Here each rank reduces its shard to four fp32 numbers per token in one pass over
the bf16 logits (max, sum exp(z - max), the target's logit, sum exp(z - max) z), the ranks combine
them with one MAX and one SUM all-reduce of [T]-sized tensors, and the backward recomputes the
softmax from the saved bf16 logits and writes the gradient in bf16 (one more pass, no
communication). Trade-off: the backward re-reads the logits instead of reusing a saved softmax.

The work is chunked over T (`chunk_size` tokens at a time) so the PyTorch backend's fp32
temporaries are [C, V], not [T, V]; the Triton backend needs no temporaries at all.

Backends: "auto" runs Triton on CUDA tensors and PyTorch otherwise; "triton" on CPU tensors needs
`TRITON_INTERPRET=1` (see `_triton.py`); "torch" is the reference implementation of the same
algorithm (fp32 math, fp64 for fp64 inputs so that `gradcheck` can check its backward).

Call site (ready): the GRPO policy and reference log-probs in `nla_mcore.rl`, on the output layer's
vocab-parallel logits, with the TP group and the sampling temperature passed in.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._triton import resolve_backend

_FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def vocab_parallel_logprobs(logits_TV: torch.Tensor, target_T: torch.Tensor, *,
                            temperature: float = 1.0, tp_group: dist.ProcessGroup | None = None,
                            vocab_start_index: int | None = None, with_entropy: bool = False,
                            chunk_size: int = 4096, backend: str = "auto"):
    """log p(target) per token, fp32 [T] (and the entropy [T] when `with_entropy`), differentiable.

    logits_TV: this rank's vocab shard of the logits, [T, V/tp], any float dtype (bf16 expected).
    target_T: global token ids, int; a target outside this shard contributes 0 here.
    tp_group: the tensor-parallel group the vocab is split over; None means tp = 1.
    vocab_start_index: the global id of this shard's first column; None means
        rank(tp_group) * V/tp (Megatron-Core's even split), or 0 without a group.
    """
    _check_inputs(logits_TV, target_T, temperature, chunk_size)
    start = _vocab_start(logits_TV.shape[1], tp_group, vocab_start_index)
    impl = resolve_backend(backend, logits_TV)
    return _VocabParallelLogprobs.apply(logits_TV, target_T, float(temperature), tp_group, start,
                                        with_entropy, chunk_size, impl)


def megatron_reference_logprobs(logits_TV: torch.Tensor, target_T: torch.Tensor,
                                temperature: float = 1.0) -> torch.Tensor:
    """Megatron-Core's answer: -vocab_parallel_cross_entropy(logits.float() / temperature, target).

    Reads Megatron-Core's global tensor-parallel state (initialize_model_parallel must have run).
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return -vocab_parallel_cross_entropy(logits_TV.float() / temperature, target_T)


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TV, target_T, temperature, group, start, with_entropy, chunk, impl):
        logits_TV = logits_TV if logits_TV.stride(-1) == 1 else logits_TV.contiguous()
        target_T = target_T.contiguous()
        stats_T4 = _chunked_local_stats(logits_TV, target_T, start, 1.0 / temperature,
                                        with_entropy, chunk, impl)
        lse_T, logp_T, mean_z_T = _combine_across_ranks(stats_T4, group, with_entropy)
        ctx.save_for_backward(logits_TV, target_T, lse_T, mean_z_T)
        ctx.args = (1.0 / temperature, start, with_entropy, chunk, impl)
        ctx.mark_non_differentiable(target_T)
        return (logp_T, lse_T - mean_z_T) if with_entropy else logp_T

    @staticmethod
    def backward(ctx, g_lp_T, g_ent_T=None):
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        logits_TV, target_T, lse_T, mean_z_T = ctx.saved_tensors
        inv_temp, start, with_entropy, chunk, impl = ctx.args
        acc = lse_T.dtype
        g_lp_T = g_lp_T.to(acc).contiguous()
        g_ent_T = g_ent_T.to(acc).contiguous() if with_entropy else None
        grad_TV = torch.empty_like(logits_TV)
        for c0 in range(0, logits_TV.shape[0], chunk):
            c = slice(c0, c0 + chunk)
            args = (logits_TV[c], target_T[c], lse_T[c], mean_z_T[c] if with_entropy else None,
                    g_lp_T[c], g_ent_T[c] if with_entropy else None, start, inv_temp, grad_TV[c])
            if impl == "triton":
                from ._logprob_triton import logits_grad

                logits_grad(*args)
            else:
                _logits_grad_torch(*args)
        return grad_TV, None, None, None, None, None, None, None


def _chunked_local_stats(logits_TV, target_T, start, inv_temp, with_entropy, chunk, impl):
    acc = torch.float32 if impl == "triton" else _acc_dtype(logits_TV.dtype)
    stats_T4 = torch.empty(logits_TV.shape[0], 4, dtype=acc, device=logits_TV.device)
    for c0 in range(0, logits_TV.shape[0], chunk):
        c = slice(c0, c0 + chunk)
        args = (logits_TV[c], target_T[c], start, inv_temp, with_entropy, stats_T4[c])
        if impl == "triton":
            from ._logprob_triton import local_stats

            local_stats(*args)
        else:
            _local_stats_torch(*args)
    return stats_T4


def _combine_across_ranks(stats_T4: torch.Tensor, group, with_entropy: bool):
    """Global (lse, logp, E_p[z]) per token from each rank's (max, sum-exp, z_target, sum e z)."""
    m_loc_T, s_loc_T, zt_T, ez_loc_T = stats_T4.unbind(1)
    m_T = m_loc_T.clone()
    if group is not None:
        dist.all_reduce(m_T, op=dist.ReduceOp.MAX, group=group)
    w_T = torch.where(m_loc_T == float("-inf"), 0.0, torch.exp(m_loc_T - m_T))
    parts = [s_loc_T * w_T, zt_T] + ([ez_loc_T * w_T] if with_entropy else [])
    sums_KT = torch.stack(parts)
    if group is not None:
        dist.all_reduce(sums_KT, op=dist.ReduceOp.SUM, group=group)
    lse_T = m_T + torch.log(sums_KT[0])
    mean_z_T = sums_KT[2] / sums_KT[0] if with_entropy else torch.zeros_like(lse_T)
    return lse_T, sums_KT[1] - lse_T, mean_z_T


def _local_stats_torch(x_CV, target_C, start, inv_temp, with_entropy, out_C4):
    """PyTorch version of the Triton stats kernel, in fp32 (fp64 for fp64 logits)."""
    z_CV = x_CV.to(out_C4.dtype) * inv_temp
    m_C = z_CV.amax(dim=1)
    m_ref_C = torch.where(m_C == float("-inf"), 0.0, m_C)
    e_CV = torch.exp(z_CV - m_ref_C[:, None])
    idx_C, in_shard_C = _local_target(target_C, start, x_CV.shape[1])
    zt_C = z_CV.gather(1, idx_C[:, None]).squeeze(1)
    out_C4[:, 0] = m_C
    out_C4[:, 1] = e_CV.sum(dim=1)
    out_C4[:, 2] = torch.where(in_shard_C, zt_C, 0.0)
    out_C4[:, 3] = (e_CV * torch.where(e_CV > 0, z_CV, 0.0)).sum(dim=1) if with_entropy else 0.0


def _logits_grad_torch(x_CV, target_C, lse_C, mean_z_C, g_lp_C, g_ent_C, start, inv_temp,
                       out_CV):
    """PyTorch version of the Triton gradient kernel; writes into out_CV (the logits' dtype)."""
    z_CV = x_CV.to(lse_C.dtype) * inv_temp
    p_CV = torch.exp(z_CV - lse_C[:, None])
    g_CV = -g_lp_C[:, None] * p_CV
    idx_C, in_shard_C = _local_target(target_C, start, x_CV.shape[1])
    g_CV.scatter_add_(1, idx_C[:, None], torch.where(in_shard_C, g_lp_C, 0.0)[:, None])
    if g_ent_C is not None:
        g_CV -= g_ent_C[:, None] * p_CV * torch.where(p_CV > 0, z_CV - mean_z_C[:, None], 0.0)
    out_CV.copy_(g_CV * inv_temp)


def _local_target(target_C: torch.Tensor, start: int, v_local: int):
    """(column of the target in this shard, clamped into range; whether it is in this shard)."""
    local_C = target_C.long() - start
    in_shard_C = (local_C >= 0) & (local_C < v_local)
    return local_C.clamp(0, v_local - 1), in_shard_C


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _vocab_start(v_local: int, group, vocab_start_index: int | None) -> int:
    if vocab_start_index is not None:
        return int(vocab_start_index)
    return 0 if group is None else dist.get_rank(group) * v_local


def _check_inputs(logits_TV, target_T, temperature, chunk_size) -> None:
    if logits_TV.dim() != 2 or target_T.shape != logits_TV.shape[:1]:
        raise ValueError("logits must be [T, V] and target [T]; got logits "
                         f"{tuple(logits_TV.shape)} and target {tuple(target_T.shape)}")
    if logits_TV.dtype not in _FLOATS:
        raise TypeError(f"logits must be one of {_FLOATS}, got {logits_TV.dtype}")
    if target_T.dtype.is_floating_point or target_T.dtype == torch.bool:
        raise TypeError(f"target must hold integer token ids, got {target_T.dtype}")
    if target_T.device != logits_TV.device:
        raise ValueError(f"logits are on {logits_TV.device} but target is on {target_T.device}")
    if logits_TV.shape[1] == 0:
        raise ValueError("the vocab shard is empty (V = 0)")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
