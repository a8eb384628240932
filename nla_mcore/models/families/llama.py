"""Llama-3.x: SwiGLU, RMSNorm, GQA, RoPE with Llama-3 frequency scaling, no biases."""

from nla_mcore.models.families.base import Family

LLAMA = Family(
    name="llama",
    hf_model_types=("llama",),
    hf_architecture="LlamaForCausalLM",
    activations=("silu",),
    activation="silu",
)
