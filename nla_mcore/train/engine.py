"""Thin wrappers over Megatron-Core's training machinery: DDP, schedules, optimizer.

Nothing here re-implements Megatron-Core; it wires the pieces the same way for every trainer:
`wrap_ddp` (gradient buffers + `finalize_model_grads` as the schedule's finalizer),
`forward_backward` (the pipeline-aware schedule from `get_forward_backward_func`, returning the
globally reduced token-mean loss on every rank), and `build_optimizer`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func


def wrap_ddp(
    model: torch.nn.Module, *, grad_reduce_in_fp32: bool = True
) -> DistributedDataParallel:
    """Wrap a model stage in Megatron-Core DDP and register the gradient finalizer."""
    config = model.config
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=grad_reduce_in_fp32,
            overlap_grad_reduce=False,
            use_distributed_optimizer=False,
        ),
        module=model,
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    return ddp


@dataclass
class StepLoss:
    """A step's token-mean loss over the global batch and the number of tokens behind it."""

    loss: float
    num_tokens: int


def forward_backward(
    model: torch.nn.Module,
    forward_step_func,
    microbatches: list[dict],
    *,
    seq_length: int,
    forward_only: bool = False,
    loss_key: str = "lm_loss",
) -> StepLoss:
    """Run the pipeline schedule over `microbatches`; the loss is reduced onto every rank."""
    if not forward_only:
        model.zero_grad_buffer()
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
    for out in outputs:  # empty on all but the last pipeline stage
        totals += out[loss_key].to(device=device, dtype=torch.float64)
    torch.distributed.all_reduce(
        totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True)
    )
    torch.distributed.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    loss_sum, count = totals.tolist()
    return StepLoss(loss=loss_sum / max(count, 1.0), num_tokens=int(count))


def build_optimizer(
    model: torch.nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.95),
    clip_grad: float = 1.0,
):
    """Megatron-Core's optimizer (Adam; distributed optimizer off) for one model stage."""
    config = model.config
    return get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=lr,
            weight_decay=weight_decay,
            adam_beta1=betas[0],
            adam_beta2=betas[1],
            clip_grad=clip_grad,
            bf16=config.bf16,
            fp16=config.fp16,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=False,
        ),
        [model],
    )
