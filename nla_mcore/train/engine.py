"""Thin wrappers over Megatron-Core's training machinery: DDP and the schedules.

Nothing here re-implements Megatron-Core; it wires the pieces the same way for every trainer:
`wrap_ddp` (gradient buffers, overlapped bucketed reduction, the distributed optimizer's
reduce-scatter, and `finalize_model_grads` as the schedule's finalizer) and `forward_backward`
(the pipeline-aware schedule from `get_forward_backward_func`, returning the globally reduced
token-mean loss on every rank).  The optimizer and its schedule are in `optim.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.pipeline_parallel import get_forward_backward_func


def wrap_ddp(
    model: torch.nn.Module,
    *,
    grad_reduce_in_fp32: bool = True,
    distributed_optimizer: bool = False,
    overlap_grad_reduce: bool = False,
) -> DistributedDataParallel:
    """Wrap a model stage in Megatron-Core DDP and register the gradient finalizer.

    `distributed_optimizer` must match the optimizer's (`optim.build_optimizer`): DDP then
    reduce-scatters the gradients instead of all-reducing them."""
    config = model.config
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=grad_reduce_in_fp32,
            overlap_grad_reduce=overlap_grad_reduce,
            use_distributed_optimizer=distributed_optimizer,
        ),
        module=model,
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    return ddp


@dataclass
class StepLoss:
    """A step's token-mean loss over the global batch and the number of tokens behind it;
    `local_sums` holds this rank's (loss sum, count) per micro-batch (last pipeline stage
    only, else empty), to name the micro-batch when a loss is not finite."""

    loss: float
    num_tokens: int
    local_sums: list[tuple[float, float]] = field(default_factory=list)


def forward_backward(
    model: torch.nn.Module,
    forward_step_func,
    microbatches: list[dict],
    *,
    seq_length: int,
    forward_only: bool = False,
    loss_key: str = "lm_loss",
) -> StepLoss:
    """Run the pipeline schedule over `microbatches`; the loss is reduced onto every rank.

    Forward-only (evaluation), a data-parallel replica may have no micro-batch: it then only
    joins the reduction."""
    if not forward_only:
        model.zero_grad_buffer()
    if not microbatches and not forward_only:
        raise ValueError("a training step needs at least one micro-batch")
    outputs = []
    if microbatches:
        outputs = _schedule(model, forward_step_func, microbatches, seq_length, forward_only)
    return _reduce_loss(outputs, loss_key)


def forward_collect(model, forward_step_func, microbatches: list[dict], *, seq_length: int) -> list:
    """Forward-only schedule; returns what the forward step's output function gives per
    micro-batch on the last pipeline stage (an empty list on other stages)."""
    return _schedule(model, forward_step_func, microbatches, seq_length, True, collect=True)


def _schedule(model, forward_step_func, microbatches, seq_length, forward_only, collect=False):
    """Megatron-Core's schedule for this layout (no pipelining, or 1F1B) over `microbatches`."""
    return get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=iter(microbatches),
        model=model,
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=microbatches[0]["tokens"].shape[0],
        forward_only=forward_only,
        collect_non_loss_data=collect,
    )


def _reduce_loss(outputs: list[dict], loss_key: str) -> StepLoss:
    """Sum (loss, tokens) over micro-batches, DP and CP ranks; share it along the pipeline."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    local = [out[loss_key].to(device=device, dtype=torch.float64) for out in outputs]
    for sums in local:  # empty on all but the last pipeline stage
        totals += sums
    torch.distributed.all_reduce(
        totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True)
    )
    torch.distributed.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    loss_sum, count = totals.tolist()
    local_sums = [tuple(t.tolist()) for t in local]
    return StepLoss(loss=loss_sum / max(count, 1.0), num_tokens=int(count), local_sums=local_sums)
