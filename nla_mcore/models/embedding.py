"""The embedding stage: vocab-parallel lookup, Gemma's sqrt(d) scale, and virtual-token injection.

Injection is a virtual token (DESIGN.md): a batch rewrites each sample's marker id to
`vocab_size + slot`, and `injection_ND[slot]` is the (already scaled) vector that replaces that
position's embedding.  This function is Megatron-Core's `VocabParallelEmbedding.forward` +
`LanguageModelEmbedding.forward` with two additions, applied to the module's own weight so its
names, tying and sharded state dict stay Megatron-Core's:

* Gemma's `sqrt(d)` scale multiplies the *looked-up* rows in the weight dtype (as transformers
  does: `embedding(ids) * tensor(sqrt(d)).to(dtype)`); injected rows are never scaled.
* Each TP rank zeroes the rows outside its vocab shard (virtual ids are outside every shard);
  TP rank 0 alone writes the injected rows, so the TP all-reduce / SP reduce-scatter sums
  exactly one non-zero term per position and is exact in any dtype.

Context parallelism needs nothing here: the batch is split by position before the model, and a
virtual id travels with its position.  Legend: B batch, S sequence, H hidden, N injected rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.tensor_parallel import (
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)


def embed_tokens(
    embedding: LanguageModelEmbedding,
    input_ids_BS: torch.Tensor,
    *,
    vocab_size: int,
    scale: float | None = None,
    injection_NH: torch.Tensor | None = None,
) -> torch.Tensor:
    """Embed `input_ids_BS` into decoder input [S(/tp under SP), B, H]."""
    word = embedding.word_embeddings
    tp_group = word.tp_group
    weight = word.weight
    outside_BS = (input_ids_BS < word.vocab_start_index) | (input_ids_BS >= word.vocab_end_index)
    local_ids_BS = (input_ids_BS - word.vocab_start_index).masked_fill(outside_BS, 0)
    rows_BSH = F.embedding(local_ids_BS, weight)
    if scale is not None:
        rows_BSH = rows_BSH * torch.tensor(scale, dtype=torch.float32).to(weight.dtype)
    rows_BSH = rows_BSH.masked_fill(outside_BS.unsqueeze(-1), 0.0)
    if injection_NH is not None and tp_group.rank() == 0:
        rows_BSH = _write_injected_rows(rows_BSH, input_ids_BS, injection_NH, vocab_size)
    rows_SBH = rows_BSH.transpose(0, 1).contiguous()
    if embedding.config.sequence_parallel:
        hidden_SBH = reduce_scatter_to_sequence_parallel_region(rows_SBH, group=tp_group)
        if embedding.embedding_dropout.p == 0:
            return hidden_SBH
        with tensor_parallel.get_cuda_rng_tracker().fork():  # sequence shards differ per rank
            return embedding.embedding_dropout(hidden_SBH)
    hidden_SBH = reduce_from_tensor_model_parallel_region(rows_SBH, group=tp_group)
    return embedding.embedding_dropout(hidden_SBH)


def _write_injected_rows(rows_BSH, input_ids_BS, injection_NH, vocab_size):
    virtual_BS = input_ids_BS >= vocab_size
    slots_BS = (input_ids_BS - vocab_size).clamp(min=0)
    injected_BSH = injection_NH.to(rows_BSH.dtype)[slots_BS.clamp(max=injection_NH.shape[0] - 1)]
    return torch.where(virtual_BS.unsqueeze(-1), injected_BSH, rows_BSH)
