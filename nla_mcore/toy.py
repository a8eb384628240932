"""Tiny, random models of each family, built from configs (no hub access needed).

Used by the quickstart, the tests and the docs' examples.  Each config keeps the family's
distinguishing features switched on at toy size: Qwen2's QKV bias and untied head, Llama-3's
RoPE scaling (with a short original context so the scaling actually changes frequencies), and
Gemma-3's interleaved sliding-window / global layers (window shorter than the test sequences),
second RoPE base, linear RoPE scaling, QK-norm, `query_pre_attn_scalar` different from the head
dim, and tied embeddings.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

_COMMON = dict(
    vocab_size=1536,  # = toy_tokenizers.VOCAB_SIZE (a test checks it), divisible by tp up to 8
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    initializer_range=0.02,
)

TOY_HF_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2": dict(
        _COMMON,
        model_type="qwen2",
        architectures=["Qwen2ForCausalLM"],
        hidden_act="silu",
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        use_sliding_window=False,
    ),
    "llama": dict(
        _COMMON,
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
        tie_word_embeddings=False,
    ),
    "gemma3": dict(
        _COMMON,
        model_type="gemma3_text",
        architectures=["Gemma3ForCausalLM"],
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=24,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_theta=1000000.0,
        rope_local_base_freq=10000.0,
        rope_scaling=dict(rope_type="linear", factor=8.0),
        tie_word_embeddings=True,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
    ),
}


def toy_hf_config(family: str, **overrides: Any) -> dict[str, Any]:
    """A tiny HF `config.json` dict for `family` ('qwen2', 'llama', 'gemma3')."""
    if family not in TOY_HF_CONFIGS:
        raise KeyError(f"no toy config for family '{family}'; known: {sorted(TOY_HF_CONFIGS)}")
    config = copy.deepcopy(TOY_HF_CONFIGS[family])
    config.update(overrides)
    return config


def write_toy_hf_config(family: str, directory: str | Path, **overrides: Any) -> Path:
    """Write a toy `config.json` into `directory` and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps(toy_hf_config(family, **overrides), indent=2))
    return path


def toy_corpus() -> list[str]:
    """A small embedded English corpus as documents (for the quickstart and toy datagen)."""
    from nla_mcore.toy_tokenizers import _CORPUS

    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    return ["\n".join(lines[i : i + 4]) for i in range(0, len(lines), 4)]
