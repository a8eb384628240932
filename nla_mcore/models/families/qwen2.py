"""Qwen2 / Qwen2.5: SwiGLU, RMSNorm, GQA, RoPE, bias on the Q/K/V projections only."""

from nla_mcore.models.families.base import Family

QWEN2 = Family(
    name="qwen2",
    hf_model_types=("qwen2",),
    hf_architecture="Qwen2ForCausalLM",
    activations=("silu",),
    activation="silu",
    qkv_bias=True,
)
