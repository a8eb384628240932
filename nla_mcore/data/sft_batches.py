"""Micro-batch tensors for the two SFT stages, in the layout the forward steps take.

Right padding throughout: attention is causal, so a pad token after a sample never changes
that sample's positions, and no attention mask is needed.

* AR (`train.nla_steps.ar_forward_step`): `tokens`, `position_ids` [B, S], `readout_index` [B]
  (the last real token), `target` [B, D] (the raw vector; the loss normalises it).
* AV (`train.lm.lm_forward_step`): `tokens` [B, S] with each marker rewritten to the virtual id
  `vocab_size + b`, `labels` (next token), `loss_mask` (1 exactly where the label is a target
  token: the response and the end of turn), `position_ids`, and `injection` [B, D] (the vectors
  rescaled to `injection_scale`, see `models.injection.inject`).

Legend: B micro-batch size, S padded length, D vector width.
"""

from __future__ import annotations

import numpy as np
import torch

from nla_mcore.data.sft_tokenize import TokenizedSFT
from nla_mcore.models.injection import inject
from nla_mcore.sidecar import Tokens


def padded_ids(data: TokenizedSFT, samples_B: np.ndarray, length: int, pad_id: int):
    """(ids [B, S] right-padded with `pad_id`, lengths [B])."""
    tokens_BS = torch.full((len(samples_B), length), pad_id, dtype=torch.long)
    lengths_B = torch.zeros(len(samples_B), dtype=torch.long)
    for b, i in enumerate(samples_B):
        ids = torch.from_numpy(data.sample_ids(int(i)).astype(np.int64))
        tokens_BS[b, : len(ids)] = ids
        lengths_B[b] = len(ids)
    return tokens_BS, lengths_B


def positions(b: int, s: int) -> torch.Tensor:
    return torch.arange(s).expand(b, s).contiguous()


def ar_microbatch(data: TokenizedSFT, samples_B: np.ndarray, length: int, pad_id: int) -> dict:
    tokens_BS, lengths_B = padded_ids(data, samples_B, length, pad_id)
    return dict(
        tokens=tokens_BS,
        position_ids=positions(*tokens_BS.shape),
        readout_index=lengths_B - 1,
        target=torch.from_numpy(np.ascontiguousarray(data.vectors_ND[samples_B])),
    )


def av_microbatch(
    data: TokenizedSFT,
    samples_B: np.ndarray,
    length: int,
    pad_id: int,
    *,
    tokens: Tokens,
    vocab_size: int,
    injection_scale: float,
    vectors_ND: np.ndarray | None = None,
) -> dict:
    """`vectors_ND` replaces the set's own vectors (the shuffled-vector control)."""
    tokens_BS, lengths_B = padded_ids(data, samples_B, length, pad_id)
    prompt_B = torch.from_numpy(data.prompt_lengths_N[samples_B])
    s = tokens_BS.shape[1]
    label_pos_S = torch.arange(s)  # position i predicts token i + 1
    loss_mask_BS = (
        (label_pos_S[None, :] >= prompt_B[:, None] - 1)
        & (label_pos_S[None, :] < lengths_B[:, None] - 1)
    ).float()
    vectors = data.vectors_ND if vectors_ND is None else vectors_ND
    virtual_BS, table_BD = inject(
        tokens_BS,
        torch.from_numpy(np.ascontiguousarray(vectors[samples_B])),
        tokens=tokens,
        vocab_size=vocab_size,
        injection_scale=injection_scale,
        lengths_B=lengths_B,
    )
    return dict(
        tokens=virtual_BS,
        labels=torch.roll(tokens_BS, shifts=-1, dims=1),
        loss_mask=loss_mask_BS,
        position_ids=positions(*tokens_BS.shape),
        injection=table_BD,
    )
