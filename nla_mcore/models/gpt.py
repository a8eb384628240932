"""`NLAGPTModel`: Megatron-Core's `GPTModel` with our embedding stage and HF-exact RoPE.

Two small changes, both through `GPTModel`'s own extension points:
* the first pipeline stage embeds with `embedding.embed_tokens` (sqrt(d) scale, injection) and
  hands the result to `GPTModel.forward` as `decoder_input`;
* the rotary table's inverse frequencies are the family's (linear / Llama-3 scaling computed as
  transformers does) instead of Megatron-Core's built-in variants.
Everything else (decoder, output layer, tied embeddings, vocab-parallel loss, sharded state
dicts, pipeline hooks) is `GPTModel` unchanged.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt.gpt_model import GPTModel

from nla_mcore.models.embedding import embed_tokens


class NLAGPTModel(GPTModel):
    """A `GPTModel` whose forward also takes an `injection` table (see `embedding.py`)."""

    def __init__(
        self,
        *args,
        embedding_scale: float | None = None,
        rope_inv_freq: torch.Tensor | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.embedding_scale = embedding_scale
        if rope_inv_freq is not None and hasattr(self, "rotary_pos_emb"):
            self.rotary_pos_emb.inv_freq = rope_inv_freq.to(self.rotary_pos_emb.inv_freq.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        injection: torch.Tensor | None = None,
        decoder_input: torch.Tensor | None = None,
        **kwargs,
    ):
        """As `GPTModel.forward`; `injection` [n_slots, hidden] feeds ids >= vocab_size."""
        if self.pre_process and decoder_input is None:
            decoder_input = embed_tokens(
                self.embedding,
                input_ids,
                vocab_size=self.vocab_size,
                scale=self.embedding_scale,
                injection_NH=injection,
            )
        return super().forward(
            input_ids, position_ids, attention_mask, decoder_input=decoder_input, **kwargs
        )
