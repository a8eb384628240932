"""Small Megatron-Core module variants that Gemma-3 needs and the stock specs lack.

* `post_norm_linear(cls)`: a row-parallel linear followed by an RMSNorm.  Gemma-3 normalises
  the attention and MLP outputs before the residual add ("sandwich" norms); putting that norm
  at the end of `linear_proj` / `linear_fc2` keeps Megatron-Core's `TransformerLayer` unchanged
  (Megatron-Bridge does the same).  The norm acts on the reduced (or, under sequence
  parallelism, reduce-scattered) output, so it is exact under TP and SP.
* `DualRopeSelfAttention`: Gemma-3's sliding-window layers rotate with their own RoPE base
  (10k) while global layers use the model's (1M, linearly scaled).  `GPTModel` computes one
  rotary table; the local layers swap in theirs, same length and CP slicing.
"""

from __future__ import annotations

from functools import cache

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.utils import is_layer_window_attention

from nla_mcore.models.hf_config import RopeSpec, rope_inv_freq
from nla_mcore.models.norms import RMSNorm


@cache
def post_norm_linear(linear_cls: type, norm_cls: type = RMSNorm) -> type:
    """A subclass of `linear_cls` (Megatron's or TE's row-parallel linear) with a post-norm."""

    class PostNormLinear(linear_cls):
        def __init__(self, input_size, output_size, *, config, **kwargs):
            super().__init__(input_size, output_size, config=config, **kwargs)
            self.post_layernorm = norm_cls(
                config=config, hidden_size=output_size, eps=config.layernorm_epsilon
            )

        def forward(self, x):
            out, bias = super().forward(x)
            if bias is not None:
                out = out + bias
            return self.post_layernorm(out), None

    PostNormLinear.__name__ = f"PostNorm{linear_cls.__name__}"
    PostNormLinear.__qualname__ = PostNormLinear.__name__
    return PostNormLinear


class DualRopeSelfAttention(SelfAttention):
    """`SelfAttention` whose sliding-window layers use `local_rope` instead of the model's RoPE."""

    def __init__(self, config, submodules, layer_number, *, local_rope: RopeSpec, **kwargs):
        super().__init__(config, submodules, layer_number, **kwargs)
        self.local_rotary = None
        if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number
        ):
            self.local_rotary = RotaryEmbedding(
                kv_channels=config.kv_channels,
                rotary_percent=1.0,
                use_cpu_initialization=True,
                cp_group=self.pg_collection.cp,
            )
            device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
            self.local_rotary.inv_freq = rope_inv_freq(local_rope, config.kv_channels).to(device)

    def forward(self, hidden_states, attention_mask=None, *args, rotary_pos_emb=None, **kwargs):
        if self.local_rotary is not None and rotary_pos_emb is not None:
            cp_size = self.pg_collection.cp.size() if self.pg_collection.cp is not None else 1
            rotary_pos_emb = self.local_rotary(rotary_pos_emb.shape[0] * cp_size)
        return super().forward(
            hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb, **kwargs
        )
