"""Causal-LM micro-batches and the token-sum loss the schedules consume.

A micro-batch is a dict of [B, S] tensors: `tokens`, `labels` (tokens shifted left),
`loss_mask` (1 where the label is a real, supervised token) and `position_ids`.  The loss
function returns the *sum* over supervised tokens and their count; with
`TransformerConfig.calculate_per_token_loss` Megatron-Core's schedule and `finalize_model_grads`
divide gradients by the global token count (all micro-batches, all DP and CP ranks), so the
loss and gradients are the global token mean whatever the layout.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core.utils import get_batch_on_this_cp_rank

SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def lm_microbatch(tokens_BS: torch.Tensor, pad_mask_BS: torch.Tensor | None = None) -> dict:
    """Next-token targets for right-padded `tokens_BS` (`pad_mask_BS`: True at padding)."""
    labels_BS = torch.roll(tokens_BS, shifts=-1, dims=1)
    loss_mask_BS = torch.ones_like(tokens_BS, dtype=torch.float32)
    loss_mask_BS[:, -1] = 0.0
    if pad_mask_BS is not None:
        next_is_pad_BS = torch.roll(pad_mask_BS, shifts=-1, dims=1)
        loss_mask_BS = loss_mask_BS * (~next_is_pad_BS).float() * (~pad_mask_BS).float()
    b, s = tokens_BS.shape
    position_ids_BS = torch.arange(s, device=tokens_BS.device).expand(b, s).contiguous()
    return dict(
        tokens=tokens_BS, labels=labels_BS, loss_mask=loss_mask_BS, position_ids=position_ids_BS
    )


def token_sum_loss(loss_mask_BS: torch.Tensor, per_token_loss_BS: torch.Tensor):
    """Megatron-Core loss_func: (sum of masked token losses, token count, values to report)."""
    loss_mask_BS = loss_mask_BS.float()
    total = (per_token_loss_BS.float() * loss_mask_BS).sum()
    count = loss_mask_BS.sum()
    return total, count.to(torch.int), {"lm_loss": torch.stack([total.detach(), count.detach()])}


def lm_forward_step(data_iterator, model):
    """Megatron-Core forward_step_func for causal-LM training on this rank's CP slice."""
    microbatch = next(data_iterator)
    local = get_batch_on_this_cp_rank({k: microbatch[k] for k in SEQUENCE_KEYS})
    output_BS = model(
        local["tokens"],
        local["position_ids"],
        None,
        labels=local["labels"],
        injection=microbatch.get("injection"),
    )
    return output_BS, partial(token_sum_loss, local["loss_mask"])


def logits_forward_step(data_iterator, model):
    """forward_step_func returning full-vocabulary logits [B, S, V] (TP-gathered) per micro-batch,
    for `engine.forward_collect` (inference, evaluation, conversion checks)."""
    microbatch = next(data_iterator)
    local = get_batch_on_this_cp_rank(
        {k: microbatch[k] for k in ("tokens", "position_ids") if k in microbatch}
    )
    logits_BSV = model(
        local["tokens"],
        local["position_ids"],
        None,
        injection=microbatch.get("injection"),
        runtime_gather_output=True,
    )
    return logits_BSV, identity_output


def identity_output(output, non_loss_data=False):
    """Output function for forward-only collection: the model output itself."""
    return output
