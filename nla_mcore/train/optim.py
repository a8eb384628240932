"""The optimizer, its learning-rate schedule, and the one health-checked update every trainer uses.

* `build_optimizer`: Megatron-Core's optimizer (AdamW) for one model stage.  With
  `distributed=True` (the default) it is the distributed optimizer: fp32 main params and Adam
  moments sharded over the data-parallel ranks (ZeRO-1), bf16 weights on the GPU.
* `build_scheduler`: Megatron-Core's `OptimizerParamScheduler` (warm-up, then cosine, linear,
  constant or WSD).  Step i (0-based) runs at the schedule's value for i + 1, so the warm-up
  reaches `lr` exactly at step `warmup_steps - 1` and no step is spent at lr 0.
* `optimizer_step`: Megatron-Core's `ChainedOptimizer.step` sequence (grads to main grads, global
  norm, clip, update) with one addition between the norm and the update: a finiteness check of
  the loss and the norm.  Both are already reduced over every rank (the loss by
  `engine.forward_backward`, the norm by the optimizer's grad-stats group), so every rank takes
  the same branch: a bad step raises `NonFiniteStepError` everywhere at once, before any weight
  changes, instead of one rank raising while the others wait in a collective.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

DECAY_STYLES = ("cosine", "linear", "constant", "wsd")
WSD_ANNEALS = ("linear", "cosine", "exponential", "minus_sqrt")


class NonFiniteStepError(FloatingPointError):
    """A step whose loss or gradient norm is NaN/inf; raised on every rank, weights untouched."""


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """AdamW with a learning-rate schedule, gradient clipping and ZeRO-1 sharding."""

    lr: float = 2e-5
    """Peak learning rate (reached at the end of the warm-up)."""
    min_lr: float = 2e-6
    """Final learning rate of the cosine / linear / WSD decay."""
    warmup_steps: int = 50
    """Linear warm-up steps from 0 to lr."""
    decay: str = "cosine"
    """After warm-up: cosine | linear (to min_lr at the last step) | constant | wsd (stable, then
    anneal to min_lr over the last wsd_fraction of the steps)."""
    wsd_fraction: float = 0.1
    """wsd: fraction of all steps spent annealing."""
    wsd_anneal: str = "linear"
    """wsd: shape of the anneal: linear | cosine | exponential | minus_sqrt."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0: no clipping; the norm is still computed)."""
    distributed: bool = True
    """Megatron-Core's distributed optimizer: main params and moments sharded over DP ranks."""
    overlap_grad_reduce: bool = True
    """Overlap the data-parallel gradient reduction with the backward pass (bucketed)."""

    def __post_init__(self):
        if self.decay not in DECAY_STYLES:
            raise ValueError(f"optim.decay={self.decay!r}: choose one of {list(DECAY_STYLES)}")
        if self.wsd_anneal not in WSD_ANNEALS:
            raise ValueError(f"optim.wsd_anneal={self.wsd_anneal!r}: one of {list(WSD_ANNEALS)}")
        if not 0 < self.lr or not 0 <= self.min_lr <= self.lr:
            raise ValueError(
                f"need 0 < optim.lr and 0 <= optim.min_lr <= optim.lr, got "
                f"lr={self.lr}, min_lr={self.min_lr}"
            )
        if self.warmup_steps < 0 or not 0 < self.wsd_fraction <= 1 or self.clip_grad < 0:
            raise ValueError(
                "optim.warmup_steps >= 0, 0 < optim.wsd_fraction <= 1 and "
                "optim.clip_grad >= 0 are required"
            )


def build_optimizer(model, cfg: OptimConfig):
    """Megatron-Core's optimizer for `model` (a DDP-wrapped stage; its config gives the dtype)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = model.config
    return get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=cfg.lr,
            min_lr=cfg.min_lr,
            weight_decay=cfg.weight_decay,
            adam_beta1=cfg.beta1,
            adam_beta2=cfg.beta2,
            adam_eps=cfg.eps,
            clip_grad=cfg.clip_grad,
            bf16=config.bf16,
            fp16=config.fp16,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=cfg.distributed,
        ),
        [model],
    )


def build_scheduler(optimizer, cfg: OptimConfig, total_steps: int):
    """The schedule over `total_steps` optimizer steps (see the module docstring)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    style = {"wsd": "WSD"}.get(cfg.decay, cfg.decay)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, warmup + 1),
        lr_decay_style=style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,  # resume restores num_steps itself (checkpointing.py)
        wsd_decay_steps=max(1, round(cfg.wsd_fraction * total_steps)) if style == "WSD" else None,
        lr_wsd_decay_style=cfg.wsd_anneal if style == "WSD" else None,
    )


@dataclass(frozen=True)
class Update:
    """What one optimizer update did."""

    lr: float
    grad_norm: float


def optimizer_step(
    optimizer, scheduler, *, loss: float, explain_failure: Callable[[float, float], str]
) -> Update:
    """Check, clip and apply the gradients of this step (module docstring), then advance the
    schedule.  `explain_failure(loss, grad_norm)` builds the error message (it may run
    collectives: every rank calls it)."""
    import torch
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    scheduler.step(increment=1)
    lr = current_lr(optimizer)
    optimizer.prepare_grads()  # model grads -> fp32 main grads (bf16 needs no loss scaling)
    grad_norm = float(optimizer.get_grad_norm())
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        scheduler.step(increment=-1)
        raise NonFiniteStepError(explain_failure(loss, grad_norm))
    with torch.no_grad():
        for part in getattr(optimizer, "chained_optimizers", [optimizer]):
            params = part.get_parameters()
            if part.config.clip_grad > 0 and params:
                clip_grad_by_total_norm_fp32(
                    params,
                    max_norm=part.config.clip_grad,
                    total_norm=grad_norm,
                    use_decoupled_grad=part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
                )
    optimizer.step_with_ready_grads()
    return Update(lr=lr, grad_norm=grad_norm)


def current_lr(optimizer) -> float:
    """The learning rate the next update uses (the schedule writes it into every param group)."""
    for group in optimizer.param_groups:
        return float(group["lr"])
    return 0.0
