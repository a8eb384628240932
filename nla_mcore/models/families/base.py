"""What distinguishes one model family from another, declared as data.

A family is one `Family` value: which HF `model_type`s it reads, its activation, and a few
architectural switches.  Everything that builds models (`nla_mcore.models.build`) and converts
checkpoints reads these switches; adding a family adds a file here and an entry in
`nla_mcore.models.registry`, not `if family == ...` branches elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from nla_mcore.models.hf_config import HFModelConfig, UnsupportedConfigError


@dataclass(frozen=True)
class Family:
    """Architecture switches of one HF model family (see the module docstring)."""

    name: str
    hf_model_types: tuple[str, ...]
    hf_architecture: str
    activations: tuple[str, ...]
    """HF activation names this family may declare; all map to `activation` below."""
    activation: str
    """'silu' (SwiGLU) or 'gelu_tanh' (GeGLU with tanh-approximate GELU)."""
    qkv_bias: bool = False
    qk_norm: bool = False
    zero_centered_norms: bool = False
    post_norms: bool = False
    scale_embeddings: bool = False
    """Multiply word embeddings by sqrt(hidden_size), rounded to the model dtype (Gemma)."""
    dual_rope: bool = False
    """Sliding-window layers use a second RoPE base (Gemma-3)."""
    softmax_scale_from_query_pre_attn_scalar: bool = False

    def check(self, hf: HFModelConfig) -> None:
        """Refuse configs this family's Megatron-Core model would not reproduce exactly."""
        if hf.hidden_act not in self.activations:
            raise UnsupportedConfigError(
                f"{self.name}: activation '{hf.hidden_act}' is not one of {self.activations}"
            )
        raw = hf.raw.get("text_config", hf.raw)
        if raw.get("mlp_bias"):
            raise UnsupportedConfigError(f"{self.name}: mlp_bias=true is not supported")
        if hf.attention_bias and not self.qkv_bias:
            raise UnsupportedConfigError(f"{self.name}: attention_bias=true is not supported")
