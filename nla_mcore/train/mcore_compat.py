"""Workarounds for Megatron-Core 0.16.1's distributed optimizer on PyTorch's own AdamW.

Without Transformer Engine or apex (CPU CI, and GPU machines without them), Megatron-Core
falls back to `torch.optim.AdamW`, and two of its checkpoint paths then misbehave.  Both
workarounds are here, used only by `checkpointing.py`, and are proven by the exact-resume tests
(a resumed run reproduces the uninterrupted one bit for bit):

* `prepare_for_load`: `DistributedOptimizer.sharded_state_dict(is_loading=True)` reads the
  Adam `step` from the optimizer state, which a fresh optimizer does not have yet (an
  `assert len(steps) == 1` fails).  We let the optimizer build its state with the library's own
  zero-gradient dummy step (`_init_optimizer_states_with_dummy_values`, which its
  `fully_sharded_model_space` loader uses); the loaded checkpoint overwrites it.
* `restore_adam_steps`: loading the `dp_reshardable` format copies each parameter's `step` from
  the *loading* template (the dummy step, 1) over the step it has just restored from the
  checkpoint's param groups, so Adam's bias correction would restart.  We set every
  parameter's step back to its param group's restored `step`.
"""

from __future__ import annotations

import torch


def distributed_parts(optimizer) -> list:
    """The `DistributedOptimizer`s inside a (chained) Megatron-Core optimizer."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [p for p in parts if isinstance(p, DistributedOptimizer)]


def prepare_for_load(optimizer) -> None:
    """Give a fresh distributed optimizer the state its loading template needs."""
    for part in distributed_parts(optimizer):
        if not part.optimizer.state:
            part._init_optimizer_states_with_dummy_values()


@torch.no_grad()
def restore_adam_steps(optimizer) -> None:
    """Per-parameter Adam `step` := its param group's restored `step` (torch AdamW only)."""
    for part in distributed_parts(optimizer):
        inner = part.optimizer
        if not isinstance(inner, torch.optim.Optimizer):
            continue  # TE / apex fused Adam keep the step in the param group: nothing to fix
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                state = inner.state.get(param)
                if state and "step" in state:
                    state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)
