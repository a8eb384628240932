"""Warnings every rank would print on every run, that say nothing a user can act on.

Each filter names the message it hides and why it is harmless here; anything else still shows.
"""

from __future__ import annotations

import warnings

KNOWN = (
    # Megatron-Core falls back to torch optimizers and local kernels without TE/apex; the run's
    # first lines say which layer backend is used.
    (UserWarning, r"Transformer Engine and Apex are not installed"),
    # The distributed optimizer reads `.grad` of fp32 parameter views (its shards); harmless.
    (UserWarning, r"The \.grad attribute of a Tensor that is not a leaf Tensor"),
    # Megatron-Core 0.16.1 calls the collectives torch 2.13 renamed; they still work.
    (FutureWarning, r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)`"),
)


def silence_known_warnings() -> None:
    for category, message in KNOWN:
        warnings.filterwarnings("ignore", message=message, category=category)
