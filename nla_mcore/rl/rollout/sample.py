"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling with a
seeded generator.  Runs on the device, no host reads.  Legend: N samples, V vocabulary.
"""

from __future__ import annotations

import torch

from nla_mcore.rl.rollout.interface import SamplingParams


def next_tokens(
    logits_NV: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N], their log-probs [N] in float32 under the temperature-scaled softmax, before
    any top-k/top-p cut; greedy: the untempered softmax)."""
    logits_NV = logits_NV.float()
    if params.temperature == 0:
        ids_N = logits_NV.argmax(dim=-1)
        logprobs_NV = torch.log_softmax(logits_NV, dim=-1)
        return ids_N, logprobs_NV.gather(1, ids_N[:, None]).squeeze(1)
    scaled_NV = logits_NV / params.temperature
    logprobs_NV = torch.log_softmax(scaled_NV, dim=-1)
    kept_NV = truncated(scaled_NV, params.top_k, params.top_p)
    probs_NV = torch.softmax(kept_NV, dim=-1)
    ids_N = torch.multinomial(probs_NV, 1, generator=generator).squeeze(1)
    return ids_N, logprobs_NV.gather(1, ids_N[:, None]).squeeze(1)


def truncated(scaled_NV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """`scaled_NV` with -inf outside the top-k and outside the smallest top-p nucleus (the most
    likely token always stays)."""
    out_NV = scaled_NV
    if 0 < top_k < scaled_NV.shape[-1]:
        kth_N1 = torch.topk(scaled_NV, top_k, dim=-1).values[:, -1:]
        out_NV = out_NV.masked_fill(out_NV < kth_N1, float("-inf"))
    if top_p < 1.0:
        sorted_NV, order_NV = torch.sort(out_NV, dim=-1, descending=True)
        cumulative_NV = torch.softmax(sorted_NV, dim=-1).cumsum(dim=-1)
        # drop a token when the ones before it already reach top_p
        drop_sorted_NV = (cumulative_NV - torch.softmax(sorted_NV, dim=-1)) >= top_p
        drop_NV = drop_sorted_NV.scatter(1, order_NV, drop_sorted_NV)
        out_NV = out_NV.masked_fill(drop_NV, float("-inf"))
    return out_NV
