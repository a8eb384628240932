"""The KL reference policy (the SFT AV) as a pinned host copy, swapped into the live AV.

GRPO's KL term needs the reference policy's log-probs of every rollout.  A second model on the
GPU would cost a whole AV of memory; instead the reference weights live in pinned host memory
and are copied *into the live AV's own parameters* for the reference pass:

    with reference.swapped_in():      # live weights -> host stash, reference -> the GPU params
        ref_logprobs = forward(...)   # the live modules, computing with the reference weights
    # on exit: the live weights are copied back, bit for bit

The copies go into the parameters' storage in place (`Tensor.copy_`), so DDP's parameter
buffers, the distributed optimizer's views and any CUDA graph keep pointing at the same memory;
gradients and optimizer state are never touched (the pass runs under `torch.no_grad`).  Cost
per swap: one device-to-host copy of the live weights and two host-to-device copies, at pinned
bandwidth.  Each rank keeps only its own shard (TP/PP).  Legend: none (flat parameter lists).
"""

from __future__ import annotations

import contextlib

import torch


class ReferencePolicy:
    """A snapshot of `model`'s parameters, to be swapped back into the same `model` later.

    Take it when the model holds the reference weights: after loading the SFT AV and before a
    resume loads an RL checkpoint's weights (the reference of a resumed run is still the SFT
    AV, not the weights it resumes from)."""

    def __init__(self, model):
        self.model = _unwrap(model)
        self.params = [p for _, p in sorted(self.model.named_parameters())]
        pin = self.params[0].is_cuda if self.params else False
        with torch.no_grad():
            self.reference = [_host_copy(p, pin) for p in self.params]
            self._stash = [  # the live weights wait here during a reference pass
                torch.empty(r.shape, dtype=r.dtype, pin_memory=pin) for r in self.reference
            ]
        self.swaps = 0

    @contextlib.contextmanager
    def swapped_in(self):
        """Run the block with the reference weights in the live model (no grad)."""
        with torch.no_grad():
            for p, stash, ref in zip(self.params, self._stash, self.reference, strict=True):
                stash.copy_(p, non_blocking=True)
                p.copy_(ref, non_blocking=True)
            _sync(self.params)
        try:
            with torch.no_grad():
                yield self.model
        finally:
            with torch.no_grad():
                for p, stash in zip(self.params, self._stash, strict=True):
                    p.copy_(stash, non_blocking=True)
                _sync(self.params)
            self.swaps += 1

    @property
    def nbytes(self) -> int:
        """Host bytes held (the reference and the stash)."""
        return 2 * sum(r.numel() * r.element_size() for r in self.reference)


def _host_copy(p: torch.Tensor, pin: bool) -> torch.Tensor:
    out = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin)
    return out.copy_(p.detach())


def _sync(params) -> None:
    if params and params[0].is_cuda:
        torch.cuda.synchronize(params[0].device)


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model
