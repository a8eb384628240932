"""Transformer-layer specs: Transformer Engine's modules where TE imports, ours otherwise.

Both specs build the same Megatron-Core `TransformerLayer` (pre-norm attention + gated MLP);
they differ only in the leaf modules.  The local spec maps its norm names onto TE's fused
names in sharded state dicts (`input_layernorm.` -> `self_attention.linear_qkv.layer_norm_`),
as Megatron-Core's own local spec does, so a dist-checkpoint written under one backend loads
under the other.

Family traits enter as three switches: `qk_norm` (Gemma-3), `post_norms` (Gemma-3's sandwich
norms, see `layers.post_norm_linear`) and `local_rope` (Gemma-3's second RoPE base for
sliding-window layers).  The TE path cannot run on the CPU or on the project's GPU machine
(the TE wheel is too large to carry); it is exercised only where TE is installed.
"""

from __future__ import annotations

import importlib.util

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from nla_mcore.models.attention import SDPAttention
from nla_mcore.models.hf_config import RopeSpec
from nla_mcore.models.layers import DualRopeSelfAttention, post_norm_linear
from nla_mcore.models.norms import RMSNorm

BACKENDS = ("auto", "local", "te")


def transformer_engine_available() -> bool:
    """True when `transformer_engine.pytorch` can be imported (checked without importing it)."""
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_backend(backend: str) -> str:
    """'auto' -> 'te' when Transformer Engine is installed, else 'local'."""
    if backend not in BACKENDS:
        raise ValueError(f"model.backend must be one of {BACKENDS}, got '{backend}'")
    if backend == "auto":
        return "te" if transformer_engine_available() else "local"
    if backend == "te" and not transformer_engine_available():
        raise ImportError("model.backend=te but transformer_engine is not installed; use 'local'")
    return backend


def block_spec(
    config: TransformerConfig,
    backend: str,
    *,
    qk_norm: bool,
    post_norms: bool,
    local_rope: RopeSpec | None,
) -> TransformerBlockSubmodules:
    """This pipeline stage's decoder spec for `backend` ('local' or 'te', see `resolve_backend`):
    its layers and the final norm (which the stock specs would make a torch/TE LayerNorm)."""
    traits = dict(qk_norm=qk_norm, post_norms=post_norms, local_rope=local_rope)
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        layer, final_norm = _te_layer_spec(**traits), TENorm
    else:
        layer, final_norm = _local_layer_spec(**traits), RMSNorm
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config), layer_norm=final_norm
    )


def _attention_spec(submodules: SelfAttentionSubmodules, local_rope: RopeSpec | None):
    params = {"attn_mask_type": AttnMaskType.causal}
    if local_rope is None:
        return ModuleSpec(module=SelfAttention, params=params, submodules=submodules)
    params["local_rope"] = local_rope
    return ModuleSpec(module=DualRopeSelfAttention, params=params, submodules=submodules)


def _local_layer_spec(*, qk_norm, post_norms, local_rope) -> ModuleSpec:
    row_linear = post_norm_linear(RowParallelLinear) if post_norms else RowParallelLinear
    attention = SelfAttentionSubmodules(
        linear_qkv=ColumnParallelLinear,
        core_attention=SDPAttention,
        linear_proj=row_linear,
        q_layernorm=RMSNorm if qk_norm else IdentityOp,
        k_layernorm=RMSNorm if qk_norm else IdentityOp,
    )
    mlp = ModuleSpec(
        module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=row_linear)
    )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=_attention_spec(attention, local_rope),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )


def _te_layer_spec(*, qk_norm, post_norms, local_rope) -> ModuleSpec:
    from megatron.core.extensions.transformer_engine import (
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TENorm,
        TERowParallelLinear,
    )

    row_linear = (
        post_norm_linear(TERowParallelLinear, TENorm) if post_norms else TERowParallelLinear
    )
    attention = SelfAttentionSubmodules(
        linear_qkv=TELayerNormColumnParallelLinear,
        core_attention=TEDotProductAttention,
        linear_proj=row_linear,
        q_layernorm=TENorm if qk_norm else IdentityOp,
        k_layernorm=TENorm if qk_norm else IdentityOp,
    )
    mlp = ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(linear_fc1=TELayerNormColumnParallelLinear, linear_fc2=row_linear),
    )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            self_attention=_attention_spec(attention, local_rope),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )
