"""Gemma-3 (text): GeGLU (tanh GELU), zero-centred (1 + w) RMSNorms before *and* after attention
and MLP, QK-norm, sqrt(d)-scaled embeddings, interleaved sliding-window / global layers with two
RoPE bases, softmax scale `query_pre_attn_scalar ** -0.5`, tied embeddings."""

from nla_mcore.models.families.base import Family

GEMMA3 = Family(
    name="gemma3",
    hf_model_types=("gemma3_text", "gemma3"),
    hf_architecture="Gemma3ForCausalLM",
    activations=("gelu_pytorch_tanh", "gelu_tanh"),
    activation="gelu_tanh",
    qk_norm=True,
    zero_centered_norms=True,
    post_norms=True,
    scale_embeddings=True,
    dual_rope=True,
    softmax_scale_from_query_pre_attn_scalar=True,
)
