"""Fused kernels and their PyTorch references (`nla_mcore.kernels`).

- `normalized_mse`: per-row normalised MSE (AR loss, RL reward, FVE), one pass forward and backward.
- `vocab_parallel_logprobs`: per-token log-probs (and entropy) over vocab-parallel logits (GRPO).

Triton is optional: it is imported only when a Triton backend runs (see `_triton.py`).
"""

from .logprob import vocab_parallel_logprobs
from .nmse import normalize, normalized_mse, normalized_mse_reference

__all__ = ["normalize", "normalized_mse", "normalized_mse_reference", "vocab_parallel_logprobs"]
