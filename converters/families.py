"""The HF <-> Megatron-Core parameter mappings of each family, declared as data.

HF names are written for the `*ForCausalLM` layout (`model.` prefix, `lm_head`); readers of
other layouts (Gemma-3's multimodal checkpoints keep the language model under
`language_model.model.` or `model.language_model.`) translate the prefix (`hf_to_mcore`).
Adding a family adds an entry here (and its `Family` in `nla_mcore/models/families/`).
"""

from __future__ import annotations

from nla_mcore.converters.mappings import QKV, Direct, GatedMLP, Mapping

L = "decoder.layers.{layer}."
H = "model.layers.{layer}."

_EMBEDDING = Direct("embedding.word_embeddings.weight", hf="model.embed_tokens.weight")
_FINAL_NORM = Direct("decoder.final_layernorm.weight", hf="model.norm.weight")
_LM_HEAD = Direct("output_layer.weight", hf="lm_head.weight")

_ATTENTION = [
    QKV(
        L + "self_attention.linear_qkv.weight",
        q=H + "self_attn.q_proj.weight",
        k=H + "self_attn.k_proj.weight",
        v=H + "self_attn.v_proj.weight",
    ),
    Direct(L + "self_attention.linear_proj.weight", hf=H + "self_attn.o_proj.weight"),
]
_MLP = [
    GatedMLP(
        L + "mlp.linear_fc1.weight", gate=H + "mlp.gate_proj.weight", up=H + "mlp.up_proj.weight"
    ),
    Direct(L + "mlp.linear_fc2.weight", hf=H + "mlp.down_proj.weight"),
]
_PRE_NORMS = [
    Direct(L + "self_attention.linear_qkv.layer_norm_weight", hf=H + "input_layernorm.weight"),
    Direct(L + "mlp.linear_fc1.layer_norm_weight", hf=H + "post_attention_layernorm.weight"),
]

LLAMA = [_EMBEDDING, *_PRE_NORMS, *_ATTENTION, *_MLP, _FINAL_NORM, _LM_HEAD]

QWEN2 = [
    *LLAMA,
    QKV(
        L + "self_attention.linear_qkv.bias",
        q=H + "self_attn.q_proj.bias",
        k=H + "self_attn.k_proj.bias",
        v=H + "self_attn.v_proj.bias",
    ),
]

GEMMA3 = [
    _EMBEDDING,
    *_ATTENTION,
    *_MLP,
    _FINAL_NORM,
    _LM_HEAD,  # used only by untied checkpoints; Gemma-3 ties it to the embedding
    Direct(L + "self_attention.linear_qkv.layer_norm_weight", hf=H + "input_layernorm.weight"),
    Direct(L + "self_attention.q_layernorm.weight", hf=H + "self_attn.q_norm.weight"),
    Direct(L + "self_attention.k_layernorm.weight", hf=H + "self_attn.k_norm.weight"),
    # Gemma's "post_attention_layernorm" normalises the attention output (a post-norm), unlike
    # Llama's, which is the pre-MLP norm.
    Direct(
        L + "self_attention.linear_proj.post_layernorm.weight",
        hf=H + "post_attention_layernorm.weight",
    ),
    Direct(L + "mlp.linear_fc1.layer_norm_weight", hf=H + "pre_feedforward_layernorm.weight"),
    Direct(L + "mlp.linear_fc2.post_layernorm.weight", hf=H + "post_feedforward_layernorm.weight"),
]

MAPPINGS: dict[str, list[Mapping]] = {"qwen2": QWEN2, "llama": LLAMA, "gemma3": GEMMA3}


def mappings_for(family: str, *, tied: bool, backbone_only: bool = False) -> list[Mapping]:
    """The mappings of `family`: without `lm_head` when embeddings are tied, and without the
    final norm and `lm_head` for a backbone (the AR)."""
    if family not in MAPPINGS:
        raise KeyError(f"no converter mappings for family '{family}'; known: {sorted(MAPPINGS)}")
    dropped = {_LM_HEAD} if tied else set()
    if backbone_only:
        dropped |= {_LM_HEAD, _FINAL_NORM}
    return [m for m in MAPPINGS[family] if m not in dropped]
