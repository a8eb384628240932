"""A normalised, typed view of a Hugging Face `config.json` for the families we support.

Hub checkpoints were written by several transformers releases: 4.x files carry `rope_theta`,
`rope_scaling`, `rope_local_base_freq` and `sliding_window_pattern`; 5.x files carry
`rope_parameters` (per layer type for Gemma-3) and `layer_types`.  Gemma-3 instruction models
ship as `Gemma3ForConditionalGeneration`, with the language model under `text_config`.  This
module reads all of those into one `HFModelConfig`, so nothing downstream branches on the
transformers version; what we cannot represent exactly (e.g. YaRN RoPE, logit soft-capping)
is refused here with the key named.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"


class UnsupportedConfigError(ValueError):
    """A config.json key holds a value nla-mcore cannot reproduce exactly."""


@dataclass(frozen=True)
class RopeSpec:
    """How one attention type computes its rotary frequencies (mirrors HF rope types)."""

    theta: float
    rope_type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class HFModelConfig:
    """The architecture facts of an HF causal LM that a Megatron-Core model needs."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    initializer_range: float
    hidden_act: str
    attention_bias: bool
    rope: RopeSpec
    local_rope: RopeSpec | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    query_pre_attn_scalar: float | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_sliding(self) -> tuple[bool, ...]:
        """Per layer (0-based): True where the layer uses sliding-window attention."""
        return tuple(t == SLIDING for t in self.layer_types)


def load_hf_config(path: str | Path) -> HFModelConfig:
    """Read `config.json` (a file or the directory holding it) into an `HFModelConfig`."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no Hugging Face config at {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    return parse_hf_config(raw, source=str(path))


def parse_hf_config(raw: dict[str, Any], source: str = "config") -> HFModelConfig:
    """Normalise an HF config dict (any supported transformers version) for model building."""
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else None
    cfg = dict(text) if text is not None else dict(raw)
    if text is not None:
        cfg.setdefault("model_type", "gemma3_text")
    model_type = cfg.get("model_type", "")
    _refuse_unsupported(cfg, source)

    def need(key: str):
        if key not in cfg or cfg[key] is None:
            raise KeyError(f"{source}: required key '{key}' is missing")
        return cfg[key]

    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    num_layers = int(need("num_hidden_layers"))
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    layer_types = _layer_types(cfg, num_layers, source)
    rope, local_rope = _rope_specs(cfg, source)
    tie = raw.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))
    return HFModelConfig(
        model_type=model_type,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(tie),
        initializer_range=float(cfg.get("initializer_range", 0.02)),
        hidden_act=str(cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu"),
        attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        rope=rope,
        local_rope=local_rope,
        sliding_window=cfg.get("sliding_window") if SLIDING in layer_types else None,
        layer_types=layer_types,
        query_pre_attn_scalar=cfg.get("query_pre_attn_scalar"),
        raw=raw,
    )


def _refuse_unsupported(cfg: dict[str, Any], source: str) -> None:
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key) is not None:
            raise UnsupportedConfigError(f"{source}: '{key}'={cfg[key]} is not supported")
    if cfg.get("use_bidirectional_attention"):
        raise UnsupportedConfigError(f"{source}: bidirectional attention is not supported")


def _layer_types(cfg: dict[str, Any], num_layers: int, source: str) -> tuple[str, ...]:
    types = cfg.get("layer_types")
    if types is None:
        pattern = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern")
        if cfg.get("model_type", "").startswith("gemma3") and pattern:
            # transformers 4.x Gemma-3: every `pattern`-th layer is global.
            types = [FULL if (i + 1) % int(pattern) == 0 else SLIDING for i in range(num_layers)]
        else:
            types = [FULL] * num_layers
    if len(types) != num_layers:
        raise ValueError(f"{source}: layer_types has {len(types)} entries for {num_layers} layers")
    unknown = set(types) - {FULL, SLIDING}
    if unknown:
        raise UnsupportedConfigError(f"{source}: layer_types {sorted(unknown)} are not supported")
    if not cfg.get("model_type", "").startswith("gemma3") and SLIDING in types:
        if cfg.get("use_sliding_window"):
            raise UnsupportedConfigError(f"{source}: use_sliding_window is not supported")
        types = [FULL] * num_layers  # Qwen2 lists max_window_layers types it never uses
    return tuple(types)


def _rope_specs(cfg: dict[str, Any], source: str) -> tuple[RopeSpec, RopeSpec | None]:
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and FULL in params:  # transformers 5.x Gemma-3
        local = params.get(SLIDING)
        return _rope_spec(params[FULL], source), _rope_spec(local, source) if local else None
    if isinstance(params, dict) and params:
        global_rope = _rope_spec(params, source)
    else:
        scaling = dict(cfg.get("rope_scaling") or {})
        scaling["rope_theta"] = cfg.get("rope_theta", 10000.0)
        global_rope = _rope_spec(scaling, source)
    local_base = cfg.get("rope_local_base_freq")
    local = RopeSpec(theta=float(local_base)) if local_base is not None else None
    if local is None and cfg.get("model_type", "").startswith("gemma3"):
        local = RopeSpec(theta=10000.0)
    return global_rope, local


def _rope_spec(params: dict[str, Any], source: str) -> RopeSpec:
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = float(params.get("rope_theta", 10000.0))
    if rope_type == "default":
        return RopeSpec(theta=theta)
    if rope_type == "linear":
        return RopeSpec(theta=theta, rope_type="linear", factor=float(params["factor"]))
    if rope_type == "llama3":
        return RopeSpec(
            theta=theta,
            rope_type="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    raise UnsupportedConfigError(f"{source}: rope_type '{rope_type}' is not supported")


def rope_inv_freq(spec: RopeSpec, head_dim: int):
    """Inverse frequencies [head_dim/2] (fp32) exactly as transformers computes them."""
    import torch

    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (spec.theta**exponents)
    if spec.rope_type == "linear":
        return inv_freq / spec.factor
    if spec.rope_type == "llama3":
        return _llama3_scaled(inv_freq, spec)
    return inv_freq


def _llama3_scaled(inv_freq, spec: RopeSpec):
    import torch

    old_len = spec.original_max_position_embeddings
    low_wavelen = old_len / spec.low_freq_factor
    high_wavelen = old_len / spec.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / spec.factor, inv_freq)
    smooth = (old_len / wavelen - spec.low_freq_factor) / (
        spec.high_freq_factor - spec.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / spec.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)
