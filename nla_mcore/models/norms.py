"""RMSNorm for the local (no Transformer Engine) layer spec, sequence-parallel aware.

Megatron-Core 0.16.1's local spec wraps `torch.nn.RMSNorm` and refuses sequence parallelism.
Under SP a norm sees only its rank's slice of the sequence, so its weight gradient is a partial
sum: we mark the weight `sequence_parallel` and Megatron-Core's `finalize_model_grads`
all-reduces it across the tensor-parallel group (the same contract TE's norms follow).

Numerics follow the Hugging Face models we convert from, so logits match in fp32 and round the
same way in bf16: Llama/Qwen2 normalise in fp32, cast back, then multiply by `w`; Gemma's
zero-centred norm multiplies by `(1 + w)` in fp32 before casting.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(MegatronModule):
    """`y = x / rms(x) * w` (or `* (1 + w)` with `config.layernorm_zero_centered_gamma`)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6):
        super().__init__(config=config)
        self.eps = eps
        self.zero_centered = config.layernorm_zero_centered_gamma
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        init = torch.zeros if self.zero_centered else torch.ones
        self.weight = torch.nn.Parameter(
            init(hidden_size, dtype=config.params_dtype, device=device)
        )
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.zero_centered:
            return (normed * (1.0 + self.weight.float())).type_as(x)
        return self.weight * normed.to(x.dtype)
