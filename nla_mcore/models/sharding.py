"""How a full (TP=1, PP=1) Megatron-Core tensor maps onto this rank's parameter, and back.

The tensor-parallel dim of a parameter follows from the module that owns it: 0 for the vocab
embedding and column-parallel linears (QKV, fc1, output layer; weights and biases), 1 for
row-parallel linear weights, none for norms and row-parallel biases.  (Megatron-Core's
`partition_dim` attribute is not set on weights built with `perform_initialization=False`, as
converters build them, so it is not relied on.)  A plain contiguous split along that dim is right for everything in our models but the gated MLP's `linear_fc1`, whose rows are
`[gate; up]`: each rank holds `[gate_r; up_r]`, so gate and up are split separately.  (The
fused QKV is grouped per query group, and whole groups go to each rank, so a contiguous split
is exact when `num_query_groups % tp == 0`, which `runtime.parallel.validate_layout` enforces.)
Pipeline stages number their layers from 0; `global_name` adds the stage's layer offset.

Used by the equivalence tests (reference weights in, full gradients out) and by the converters
(an HF tensor, once fused into Megatron-Core's layout, goes through `shard_for_rank`).
"""

from __future__ import annotations

import re

import torch

_LAYER = re.compile(r"(decoder\.layers\.)(\d+)(\.)")
TIED_OUTPUT = "output_layer.weight"
WORD_EMBEDDINGS = "embedding.word_embeddings.weight"


def partition_dim(model: torch.nn.Module, name: str) -> int | None:
    """The dim parameter `name` of `model` is split along across TP ranks (None: replicated)."""
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
    )

    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    mode = getattr(module, "parallel_mode", None)  # Transformer Engine linears
    if isinstance(module, (VocabParallelEmbedding, ColumnParallelLinear)) or mode == "column":
        return 0 if attr in ("weight", "bias") else None
    if isinstance(module, RowParallelLinear) or mode == "row":
        return 1 if attr == "weight" else None
    return None


def is_gated_fc1(name: str) -> bool:
    """True for the fused [gate; up] projection of a gated MLP."""
    return ".mlp.linear_fc1." in f".{name}"


def global_name(local_name: str, layer_offset: int) -> str:
    """The TP=1/PP=1 name of a stage-local parameter name."""
    return _LAYER.sub(lambda m: f"{m[1]}{int(m[2]) + layer_offset}{m[3]}", local_name, count=1)


def shard_for_rank(
    full: torch.Tensor, *, dim: int | None, gated: bool, tp_rank: int, tp_size: int
) -> torch.Tensor:
    """This TP rank's slice of a full tensor."""
    if dim is None or tp_size == 1:
        return full
    if gated and dim == 0:
        gate, up = full.chunk(2, dim=0)
        return torch.cat(
            [
                shard_for_rank(t, dim=0, gated=False, tp_rank=tp_rank, tp_size=tp_size)
                for t in (gate, up)
            ]
        )
    if full.shape[dim] % tp_size:
        raise ValueError(f"dim {dim} of shape {tuple(full.shape)} does not split into {tp_size}")
    return full.chunk(tp_size, dim=dim)[tp_rank]


def unshard(shards: list[torch.Tensor], *, dim: int | None, gated: bool) -> torch.Tensor:
    """Inverse of `shard_for_rank`: the full tensor from every TP rank's slice (in rank order)."""
    if dim is None or len(shards) == 1:
        return shards[0]
    if gated and dim == 0:
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
    return torch.cat(shards, dim=dim)


@torch.no_grad()
def load_full_state_dict(
    model: torch.nn.Module,
    full: dict[str, torch.Tensor],
    *,
    tp_rank: int,
    tp_size: int,
    layer_offset: int,
    tied_embeddings: bool,
) -> None:
    """Copy this rank's slice of every parameter from a full TP=1/PP=1 state dict."""
    for name, param in model.named_parameters():
        source = global_name(name, layer_offset)
        if source == TIED_OUTPUT and tied_embeddings:
            source = WORD_EMBEDDINGS  # the last stage's copy of the tied embedding
        if source not in full:
            raise KeyError(f"parameter '{name}' (full name '{source}') missing from the state dict")
        piece = shard_for_rank(
            full[source],
            dim=partition_dim(model, name),
            gated=is_gated_fc1(name),
            tp_rank=tp_rank,
            tp_size=tp_size,
        )
        if piece.shape != param.shape:
            raise ValueError(
                f"'{source}': shard shape {tuple(piece.shape)} != {tuple(param.shape)}"
            )
        param.copy_(piece)


def gather_full_tensors(
    model: torch.nn.Module,
    local: dict[str, torch.Tensor],
    *,
    tp_group,
    layer_offset: int,
) -> dict[str, torch.Tensor]:
    """All-gather TP slices of per-parameter tensors (e.g. gradients) into full-named tensors."""
    tp_size = torch.distributed.get_world_size(tp_group)
    out = {}
    for name, tensor in local.items():
        dim = partition_dim(model, name)
        if dim is None or tp_size == 1:
            full = tensor
        else:
            shards = [torch.empty_like(tensor) for _ in range(tp_size)]
            torch.distributed.all_gather(shards, tensor.contiguous(), group=tp_group)
            full = unshard(shards, dim=dim, gated=is_gated_fc1(name))
        out[global_name(name, layer_offset)] = full
    return out
