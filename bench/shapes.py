"""Model shapes the benchmarks share, and a writer for random-weight HF checkpoints of them."""

from __future__ import annotations

from pathlib import Path

import torch

# Qwen2.5-1.5B: 28 layers, d 1536, 12 query / 2 KV heads, ffn 8960, vocab 151936, tied.
QWEN25_1P5B = dict(
    model_type="qwen2",
    architectures=["Qwen2ForCausalLM"],
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
    hidden_act="silu",
    use_sliding_window=False,
)


# Qwen2.5-7B's width (its config.json): d 3584, 28 query / 4 KV heads, ffn 18944, vocab 152064,
# untied embeddings.  The real model has 28 layers; benchmarks pass their own layer count.
QWEN25_7B_WIDTH = dict(
    model_type="qwen2",
    architectures=["Qwen2ForCausalLM"],
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=False,
    hidden_act="silu",
    use_sliding_window=False,
)


def write_random_hf_model(directory: Path, layers: int, device: str, shape=QWEN25_1P5B) -> float:
    """Random bf16 weights (norms around 1) saved by transformers as sharded safetensors;
    returns the model's size in GiB."""
    import transformers

    config = transformers.AutoConfig.for_model(**{**shape, "num_hidden_layers": layers})
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale, centre = (0.2, 1.0) if "norm" in name else (0.02, 0.0)
            p.copy_(torch.randn_like(p) * scale + centre)
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="1GB")
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
