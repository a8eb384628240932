"""Training FLOPs of a step, for tokens/s -> TFLOP/s and MFU.

FLOPs = 6 · P_matmul · Σ s_i + 12 · L · h_attn · Σ s_i², summed over the samples of the step:
`P_matmul` counts the weights of every matmul (QKV, attention output, the gated MLP, the LM head
when the model has one, the AR's value head; not the embedding lookup), `h_attn` = heads ·
head_dim, and the attention term counts QKᵀ and AV forward (2 · 2 · s² · h_attn per layer and
sample) times 3 for forward + backward, without halving for causality or sliding windows.  This
is the convention of Megatron-LM's reported numbers, of `bench/model_step.py` and of
FINDINGS.md, so figures compare.  Only real tokens are counted: padding is compute a step
spends but not work it does, so it lowers MFU, as it should.

MFU divides by the card's dense bf16 peak (`peak_tflops`): the vendor figure for the known cards
(the H100 and H200 share Hopper's ~989 TFLOP/s), or what the user sets.
"""

from __future__ import annotations

from collections.abc import Sequence

# Dense bf16 peaks (vendor datasheets), by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}


def matmul_params(hf, *, num_layers: int, lm_head: bool, extra: int = 0) -> int:
    """Weights of every matmul of a `num_layers`-deep model of `hf`'s shape (see module doc)."""
    d, hd = hf.hidden_size, hf.head_dim
    q, kv = hf.num_attention_heads * hd, hf.num_key_value_heads * hd
    attention = d * (q + 2 * kv) + q * d
    mlp = 3 * d * hf.intermediate_size  # gate, up, down
    head = hf.vocab_size * d if lm_head else 0
    return num_layers * (attention + mlp) + head + extra


def train_flops(
    hf, lengths: Sequence[int], *, num_layers: int, lm_head: bool, extra_params: int = 0
) -> float:
    """Forward + backward FLOPs of samples of `lengths` tokens (see module doc)."""
    params = matmul_params(hf, num_layers=num_layers, lm_head=lm_head, extra=extra_params)
    h_attn = hf.num_attention_heads * hf.head_dim
    tokens = sum(lengths)
    squares = sum(s * s for s in lengths)
    return 6.0 * params * tokens + 12.0 * num_layers * h_attn * squares


def peak_tflops(configured: float | None) -> float | None:
    """The per-GPU peak MFU is measured against: the configured value, else the card's, else None
    (CPU, or a card not in `PEAK_BF16_TFLOPS`)."""
    if configured is not None:
        return configured
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)
