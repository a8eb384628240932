"""The AV's side of a GRPO step on Megatron-Core: rollouts as micro-batches, their per-token
log-probs from the vocab-parallel logits, and the PPO-clip + KL loss as a forward step.

A rollout sample is its prompt (with the virtual marker id of its prompt, so the engine's
injection table serves all n samples of a prompt) followed by its response.  The logits at
position p predict token p + 1, so the response's log-probs are read at positions
S - 1 .. S + T - 2.  They come from `kernels.logprob.vocab_parallel_logprobs` on this rank's
vocabulary shard (never a full-vocabulary gather), at the sampling temperature, and the
schedule's loss reduction is GRPO's: a token mean per sample, then a mean over samples (each
micro-batch reports (sum over its samples, number of samples)).
Legend: N samples, S prompt length, T response tokens, L = padded S + T, V/tp vocab shard.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state as ps
from megatron.core.utils import get_batch_on_this_cp_rank

from nla_mcore.rl import grpo
from nla_mcore.rl.rollout.interface import Rollout

SEQUENCE_KEYS = ("tokens", "position_ids", "targets", "response_mask")
LOSS_KEY = "grpo_loss"


def rollout_microbatch(
    prompts_BS: torch.Tensor,
    injection_BD: torch.Tensor,
    rollout: Rollout,
    n: int,
    *,
    pad_multiple: int = 8,
    rows: slice | None = None,
) -> dict:
    """Samples `rows` (default all) of `rollout` as one micro-batch (right-padded)."""
    rows = rows or slice(0, rollout.tokens_NT.shape[0])
    tokens_NT = rollout.tokens_NT[rows].to(prompts_BS.device)
    lengths_N = rollout.lengths_N[rows].to(prompts_BS.device)
    prompt_of_N = torch.arange(rows.start, rows.start + len(tokens_NT), device=prompts_BS.device)
    prompts_NS = prompts_BS[prompt_of_N // n]
    s, t = prompts_NS.shape[1], tokens_NT.shape[1]
    length = -(-(s + t) // pad_multiple) * pad_multiple
    seq_NL = torch.zeros((len(tokens_NT), length), dtype=torch.long, device=prompts_BS.device)
    seq_NL[:, :s] = prompts_NS
    seq_NL[:, s : s + t] = tokens_NT
    targets_NL = torch.roll(seq_NL, shifts=-1, dims=1)
    response_mask_NL = torch.zeros_like(seq_NL, dtype=torch.bool)
    positions_T = torch.arange(t, device=seq_NL.device)
    alive_NT = positions_T[None, :] < lengths_N[:, None]
    response_mask_NL[:, s - 1 : s - 1 + t] = alive_NT
    b, l_ = seq_NL.shape
    return dict(
        tokens=seq_NL,
        position_ids=torch.arange(l_, device=seq_NL.device).expand(b, l_).contiguous(),
        targets=targets_NL,
        response_mask=response_mask_NL,
        injection=injection_BD,
        prompt_len=s,
        response_len=t,
    )


def response_logprobs_forward_step(data_iterator, model, *, temperature: float):
    """forward_step_func returning the response log-probs [N, T] (0 off the response), for
    `engine.forward_collect` (the reference pass, old log-probs, the health check)."""
    microbatch = next(data_iterator)
    output, local = _forward(microbatch, model)
    return output, partial(_response_logprobs, microbatch, local, temperature)


def grpo_forward_step(
    data_iterator, model, *, temperature: float, clip: float, kl_coef: float, kl_kind: str
):
    """forward_step_func of the AV's GRPO update: PPO-clip on the micro-batch's advantages and
    old log-probs, plus `kl_coef` x the KL to its reference log-probs ([N, T] each, in the
    micro-batch as `advantages`, `old_logprobs`, `ref_logprobs`)."""
    microbatch = next(data_iterator)
    output, local = _forward(microbatch, model)
    return output, partial(_grpo_loss, microbatch, local, temperature, clip, kl_coef, kl_kind)


def _forward(microbatch: dict, model):
    """The model's output: vocab-parallel logits [N, L, V/tp] on the last pipeline stage, the
    hidden states for the next stage elsewhere (the schedule sends them on)."""
    device = next(model.parameters()).device
    local = get_batch_on_this_cp_rank({k: microbatch[k].to(device) for k in SEQUENCE_KEYS})
    injection = microbatch.get("injection")
    output = model(
        local["tokens"],
        local["position_ids"],
        None,
        injection=None if injection is None else injection.to(device),
        runtime_gather_output=False,
    )
    return output, local


def _response_token_logprobs(microbatch, local, temperature, logits_NLV):
    """(log-probs [N, T] of the response tokens, their mask [N, T]) from the logits."""
    from nla_mcore.kernels.logprob import vocab_parallel_logprobs

    if ps.get_context_parallel_world_size() > 1:
        raise NotImplementedError("GRPO log-probs under CP > 1 are not supported yet")
    n, length, v_local = logits_NLV.shape
    tp = ps.get_tensor_model_parallel_world_size()
    logprobs_NL = vocab_parallel_logprobs(
        logits_NLV.reshape(n * length, v_local),
        local["targets"].reshape(-1),
        temperature=temperature if temperature > 0 else 1.0,
        tp_group=ps.get_tensor_model_parallel_group() if tp > 1 else None,
    ).view(n, length)
    s, t = microbatch["prompt_len"], microbatch["response_len"]
    return logprobs_NL[:, s - 1 : s - 1 + t], local["response_mask"][:, s - 1 : s - 1 + t]


def _response_logprobs(microbatch, local, temperature, logits_NLV, non_loss_data=False):
    logp_NT, mask_NT = _response_token_logprobs(microbatch, local, temperature, logits_NLV)
    return torch.where(mask_NT, logp_NT, 0.0).detach()


def _grpo_loss(microbatch, local, temperature, clip, kl_coef, kl_kind, logits_NLV):
    logp_NT, mask_NT = _response_token_logprobs(microbatch, local, temperature, logits_NLV)
    old_NT, ref_NT, adv_N = (
        microbatch[k].to(logp_NT.device) for k in ("old_logprobs", "ref_logprobs", "advantages")
    )
    policy, _ = grpo.policy_loss(logp_NT, old_NT, adv_N, mask_NT, clip=clip)
    kl = grpo.kl_penalty(logp_NT, ref_NT, mask_NT, kl_kind)
    n = logp_NT.shape[0]
    total = (policy + kl_coef * kl) * n  # the schedule divides by the samples of the step
    count = torch.tensor(float(n), device=total.device)
    return total, count.to(torch.int), {LOSS_KEY: torch.stack([total.detach(), count])}
