"""The parallel layout (TP, PP, CP, DP): its config, its validation, and Megatron-Core's groups.

Every constraint a layout must satisfy is checked *before* any process group is created, and
each error names the value to change: a bad layout should cost a user seconds, not a hung
NCCL job.  Data parallelism is derived (`world / (tp·pp·cp)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class LayoutError(ValueError):
    """A parallel layout that cannot run this model; the message says what to change."""


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """How the model is split across ranks; data parallelism takes what is left."""

    tensor_parallel: int = 1
    """Tensor-parallel size (splits heads, MLP and vocab; keep it within a node)."""
    pipeline_parallel: int = 1
    """Pipeline-parallel size (splits the decoder layers into stages)."""
    context_parallel: int = 1
    """Context-parallel size (splits each sequence into 2·cp load-balanced chunks)."""
    sequence_parallel: bool = False
    """Split activations outside attention/MLP along the sequence across TP ranks (needs TP > 1)."""

    def __post_init__(self):
        for name in ("tensor_parallel", "pipeline_parallel", "context_parallel"):
            if getattr(self, name) < 1:
                raise LayoutError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise LayoutError("parallel.sequence_parallel=true needs parallel.tensor_parallel > 1")

    @property
    def model_parallel_size(self) -> int:
        """Ranks holding one replica of the model: tp · pp · cp."""
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel

    def data_parallel(self, world_size: int) -> int:
        """The data-parallel size this layout leaves in a world of `world_size` ranks."""
        if world_size % self.model_parallel_size:
            raise LayoutError(
                f"world size {world_size} is not divisible by tp·pp·cp = "
                f"{self.tensor_parallel}·{self.pipeline_parallel}·{self.context_parallel} = "
                f"{self.model_parallel_size}; change the number of ranks or the parallel sizes"
            )
        return world_size // self.model_parallel_size


def validate_layout(
    parallel: ParallelConfig,
    *,
    world_size: int,
    num_attention_heads: int,
    num_query_groups: int,
    num_layers: int,
    vocab_size: int | None = None,
    seq_length: int | None = None,
) -> int:
    """Check that `parallel` can run this model; return the data-parallel size."""
    tp, pp, cp = parallel.tensor_parallel, parallel.pipeline_parallel, parallel.context_parallel
    dp = parallel.data_parallel(world_size)
    problems = []
    if num_attention_heads % tp:
        problems.append(
            f"num_attention_heads={num_attention_heads} is not divisible by tensor_parallel={tp}"
        )
    if num_query_groups % tp:
        problems.append(
            f"num_key_value_heads={num_query_groups} is not divisible by tensor_parallel={tp} "
            "(query groups are split, not replicated)"
        )
    if num_layers % pp:
        problems.append(f"num_layers={num_layers} is not divisible by pipeline_parallel={pp}")
    if vocab_size is not None and vocab_size % tp:
        problems.append(f"vocab_size={vocab_size} is not divisible by tensor_parallel={tp}")
    if seq_length is not None:
        divisor = (2 * cp if cp > 1 else 1) * (tp if parallel.sequence_parallel else 1)
        if seq_length % divisor:
            parts = []
            if cp > 1:
                parts.append(f"2·context_parallel={2 * cp}")
            if parallel.sequence_parallel:
                parts.append(f"tensor_parallel={tp} (sequence parallel)")
            problems.append(
                f"sequence length {seq_length} is not divisible by {divisor} "
                f"({' x '.join(parts)}); pad sequences to a multiple of {divisor}"
            )
    if problems:
        raise LayoutError("invalid parallel layout:\n  - " + "\n  - ".join(problems))
    return dp


def initialize_model_parallel(parallel: ParallelConfig) -> int:
    """Create Megatron-Core's process groups for `parallel`; return the data-parallel size.

    `torch.distributed` must be initialised (see `runtime.distributed.init_distributed`).
    """
    from megatron.core import parallel_state

    world = torch.distributed.get_world_size()
    dp = parallel.data_parallel(world)
    if _current_layout() == _layout(parallel):
        return dp  # same groups: re-creating NCCL communicators in one process is slow (and, on
        # the project's H100s with NCCL 2.28, failed with "Failed to CUDA calloc async")
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        context_parallel_size=parallel.context_parallel,
    )
    return dp


def _layout(parallel: ParallelConfig) -> tuple[int, int, int]:
    return (parallel.tensor_parallel, parallel.pipeline_parallel, parallel.context_parallel)


def _current_layout() -> tuple[int, int, int] | None:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None
    return (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_context_parallel_world_size(),
    )


def uneven_pipeline_split(num_layers: int, pp: int) -> dict[str, int]:
    """Megatron-Core's uneven split (first/last stage sizes) when `num_layers % pp != 0`.

    Middle stages get `num_layers // pp` layers each; the first and last share the rest, the
    first taking the larger half.  Used for truncated stacks (the AR's K+1 layers are rarely a
    multiple of pp).  Returns {} when the split is even.
    """
    if num_layers % pp == 0:
        return {}
    if num_layers < pp:
        raise LayoutError(f"{num_layers} layers cannot fill pipeline_parallel={pp} stages")
    middle = num_layers // pp
    ends = num_layers - middle * (pp - 2)
    return dict(
        num_layers_in_first_pipeline_stage=(ends + 1) // 2,
        num_layers_in_last_pipeline_stage=ends // 2,
    )
