"""Injection batches: each sample's marker token becomes a virtual id that indexes a vector table.

`inject(tokens_BS, vectors_BD, tokens=..., vocab_size=..., injection_scale=...)` rewrites the one
marker of every sample to `vocab_size + b` and returns the table `[B, D]` of the vectors rescaled
to norm `injection_scale` (NLA.md's `normalize`).  The model's embedding stage replaces those
positions with the table rows (`embedding.embed_tokens`); the rows are never multiplied by
Gemma's sqrt(d) and never pass through the word table.  Because the virtual id travels with its
position, the batch can then be split for context parallelism like any other.

Every check of the original project happens here, on the host, before anything reaches a model:
exactly one marker per (unpadded) sample, its left/right neighbours as in the canonical prompt,
one vector per sample, vector width = d, finite, non-zero norm.  The error names the sample.
Every rank of a job builds the same batch from the same data, so a bad sample makes all ranks
(every pipeline stage) raise together; `runtime.distributed.raise_on_any_rank` covers checks that
only some ranks can make.  Legend: B batch, S sequence, D model width.
"""

from __future__ import annotations

import torch

from nla_mcore.prompts import normalize
from nla_mcore.sidecar import Tokens


class InjectionError(ValueError):
    """A sample or vector that cannot be injected; the message names the sample."""


def inject(
    tokens_BS: torch.Tensor,
    vectors_BD: torch.Tensor,
    *,
    tokens: Tokens,
    vocab_size: int,
    injection_scale: float,
    lengths_B: torch.Tensor | None = None,
    d_model: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens with the marker replaced by `vocab_size + b`, injection table `[B, D]` in fp32)."""
    b = tokens_BS.shape[0]
    if vectors_BD.dim() != 2 or vectors_BD.shape[0] != b:
        raise InjectionError(
            f"{b} samples but vectors of shape {tuple(vectors_BD.shape)}: need one [D] vector each"
        )
    if d_model is not None and vectors_BD.shape[1] != d_model:
        raise InjectionError(
            f"vectors have width {vectors_BD.shape[1]}, the model's d is {d_model}"
        )
    check_vectors(vectors_BD)
    positions_B = marker_positions(tokens_BS, tokens, lengths_B)
    out_BS = tokens_BS.clone()
    out_BS[torch.arange(b), positions_B] = vocab_size + torch.arange(b)
    virtual = int((out_BS >= vocab_size).sum())
    if virtual != b:
        raise InjectionError(f"{virtual} token ids >= vocab_size {vocab_size} for {b} vectors")
    return out_BS, normalize(vectors_BD.float(), injection_scale)


def marker_positions(tokens_BS: torch.Tensor, tokens: Tokens, lengths_B=None) -> torch.Tensor:
    """The marker position of every sample, checking count and neighbours."""
    positions = []
    for b, row in enumerate(tokens_BS.tolist()):
        if lengths_B is not None:
            row = row[: int(lengths_B[b])]
        hits = [i for i, t in enumerate(row) if t == tokens.injection_token_id]
        if len(hits) != 1:
            raise InjectionError(
                f"sample {b}: the marker {tokens.injection_char!r} (id {tokens.injection_token_id}) "
                f"occurs {len(hits)} times; exactly one is required"
            )
        i = hits[0]
        if i == 0 or i == len(row) - 1:
            raise InjectionError(
                f"sample {b}: the marker is at the edge of the sequence (index {i})"
            )
        expected = (tokens.injection_left_neighbor_id, tokens.injection_right_neighbor_id)
        found = (row[i - 1], row[i + 1])
        if found != expected:
            raise InjectionError(
                f"sample {b}: marker neighbours are ids {found}, the canonical prompt has "
                f"{expected} (template or tokenizer drift?)"
            )
        positions.append(i)
    return torch.tensor(positions, dtype=torch.long)


def check_vectors(vectors_BD: torch.Tensor) -> None:
    """Finite, non-zero vectors only; the error names the first bad sample."""
    finite_B = torch.isfinite(vectors_BD).all(dim=1)
    if not bool(finite_B.all()):
        b = int((~finite_B).nonzero()[0])
        raise InjectionError(f"sample {b}: the activation vector has NaN or inf entries")
    norm_B = vectors_BD.float().norm(dim=1)
    if not bool((norm_B > 0).all()):
        b = int((norm_B <= 0).nonzero()[0])
        raise InjectionError(f"sample {b}: the activation vector is all zeros")
