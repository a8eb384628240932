"""Parameter mappings between Hugging Face tensors and Megatron-Core parameters.

Three kinds cover every family (the hard logic lives here once; families only list them):

* `Direct`   — one HF tensor is one Megatron-Core tensor (embeddings, norms, o_proj, down_proj).
* `QKV`      — q, k, v projections fused into `linear_qkv`, interleaved per query group:
               `[q heads of group 0, k0, v0, q heads of group 1, k1, v1, ...]` (Megatron-Core's
               layout; the same for the Qwen2 biases).
* `GatedMLP` — gate and up projections fused into `linear_fc1` as `[gate; up]`.

Megatron-Core names are *canonical* names: global layer numbers and Transformer Engine's fused
norm names (`self_attention.linear_qkv.layer_norm_weight`), which are also the keys of
dist-checkpoints; `canonical_name` maps the local spec's module names onto them.  `{layer}` in a
name stands for the layer number.

Each mapping can (a) read *one tensor-parallel rank's slice* straight from an `HFReader`,
touching only the rows or columns that rank owns, and (b) split a full Megatron-Core tensor back
into HF tensors for export.  The TP dimension of a parameter comes from Megatron-Core itself
(the parameter's `partition_dim`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from nla_mcore.models.hf_config import HFModelConfig

# local-spec module names -> canonical (TE / dist-checkpoint) names
_CANONICAL = (
    (".input_layernorm.", ".self_attention.linear_qkv.layer_norm_"),
    (".pre_mlp_layernorm.", ".mlp.linear_fc1.layer_norm_"),
)


def canonical_name(module_name: str) -> str:
    """The dist-checkpoint name of a parameter of either layer spec."""
    for local, te in _CANONICAL:
        module_name = module_name.replace(local, te)
    return module_name


def _row_range(n: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    if n % tp_size:
        raise ValueError(f"{n} rows do not split across {tp_size} tensor-parallel ranks")
    size = n // tp_size
    return tp_rank * size, (tp_rank + 1) * size


@dataclass(frozen=True)
class Mapping:
    """Base: `mcore` is the canonical Megatron-Core name pattern."""

    mcore: str

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.mcore

    def hf_names(self, layer: int | None) -> list[str]:
        raise NotImplementedError

    def read_shard(self, reader, layer, *, dim, tp_rank, tp_size, hf: HFModelConfig):
        """This TP rank's slice of the Megatron-Core tensor, read from the HF checkpoint."""
        raise NotImplementedError

    def to_hf(self, full: torch.Tensor, layer, hf: HFModelConfig) -> dict[str, torch.Tensor]:
        """The HF tensors of one full (TP=1) Megatron-Core tensor."""
        raise NotImplementedError


def _fill(pattern: str, layer: int | None) -> str:
    return pattern.format(layer=layer) if "{layer}" in pattern else pattern


@dataclass(frozen=True)
class Direct(Mapping):
    hf: str = ""

    def hf_names(self, layer):
        return [_fill(self.hf, layer)]

    def read_shard(self, reader, layer, *, dim, tp_rank, tp_size, hf):
        name = _fill(self.hf, layer)
        if dim is None or tp_size == 1:
            return reader.read(name)
        start, stop = _row_range(reader.shape(name)[dim], tp_rank, tp_size)
        return reader.read(name, dim, start, stop)

    def to_hf(self, full, layer, hf):
        return {_fill(self.hf, layer): full}


@dataclass(frozen=True)
class QKV(Mapping):
    q: str = ""
    k: str = ""
    v: str = ""

    def hf_names(self, layer):
        return [_fill(n, layer) for n in (self.q, self.k, self.v)]

    def read_shard(self, reader, layer, *, dim, tp_rank, tp_size, hf):
        if dim not in (0, None):
            raise ValueError(f"{self.mcore}: QKV is split along rows, not dim {dim}")
        groups = hf.num_key_value_heads
        g0, g1 = _row_range(groups, tp_rank, tp_size)
        per_group = hf.num_attention_heads // groups
        hd = hf.head_dim
        q, k, v = self.hf_names(layer)
        q_rows = reader.read(q, 0, g0 * per_group * hd, g1 * per_group * hd)
        k_rows = reader.read(k, 0, g0 * hd, g1 * hd)
        v_rows = reader.read(v, 0, g0 * hd, g1 * hd)
        return interleave_qkv(q_rows, k_rows, v_rows, groups=g1 - g0, head_dim=hd)

    def to_hf(self, full, layer, hf):
        q, k, v = split_qkv(
            full, groups=hf.num_key_value_heads, heads=hf.num_attention_heads, head_dim=hf.head_dim
        )
        return dict(zip(self.hf_names(layer), (q, k, v), strict=True))


@dataclass(frozen=True)
class GatedMLP(Mapping):
    gate: str = ""
    up: str = ""

    def hf_names(self, layer):
        return [_fill(self.gate, layer), _fill(self.up, layer)]

    def read_shard(self, reader, layer, *, dim, tp_rank, tp_size, hf):
        gate, up = self.hf_names(layer)
        start, stop = _row_range(reader.shape(gate)[0], tp_rank, tp_size)
        return torch.cat([reader.read(gate, 0, start, stop), reader.read(up, 0, start, stop)])

    def to_hf(self, full, layer, hf):
        gate, up = full.chunk(2, dim=0)
        return dict(zip(self.hf_names(layer), (gate, up), strict=True))


def interleave_qkv(q, k, v, *, groups: int, head_dim: int) -> torch.Tensor:
    """HF q [G·h·d, ...], k/v [G·d, ...] -> Megatron-Core's per-group [q_g; k_g; v_g] layout."""
    rest = q.shape[1:]
    q_g = q.reshape(groups, -1, *rest)
    k_g = k.reshape(groups, head_dim, *rest)
    v_g = v.reshape(groups, head_dim, *rest)
    return torch.cat([q_g, k_g, v_g], dim=1).reshape(-1, *rest)


def split_qkv(fused, *, groups: int, heads: int, head_dim: int):
    """Inverse of `interleave_qkv` for the full tensor: (q, k, v) in HF layout."""
    rest = fused.shape[1:]
    per_group = heads // groups
    g = fused.reshape(groups, (per_group + 2) * head_dim, *rest)
    q, k, v = g.split([per_group * head_dim, head_dim, head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def find_mapping(mappings: list[Mapping], canonical: str) -> tuple[Mapping, int | None]:
    """The mapping and layer number for a canonical Megatron-Core parameter name."""
    match = _LAYER.match(canonical)
    pattern, layer = canonical, None
    if match:
        layer = int(match[1])
        pattern = f"decoder.layers.{{layer}}.{match[2]}"
    for mapping in mappings:
        if mapping.mcore == pattern:
            return mapping, layer
    raise KeyError(f"no HF mapping for Megatron-Core parameter '{canonical}'")
