"""Megatron-Core forward-step functions for the AR (the AV uses `lm.py`'s with an injection table).

`ar_forward_step`: micro-batch dict with `tokens`, `position_ids` [B, S] (full sequence; split
here for CP), `readout_index` [B] (last non-pad position) and, for training, `target` [B, D].
Returns the model output and the loss function (`ar.ar_loss`), or the raw (prediction, owned)
pair when there is no target (evaluation, export checks).
"""

from __future__ import annotations

from functools import partial

from megatron.core.utils import get_batch_on_this_cp_rank

from nla_mcore.models.ar import ar_loss
from nla_mcore.train.lm import identity_output


def ar_forward_step(data_iterator, model, *, mse_scale: float | None = None):
    microbatch = next(data_iterator)
    local = get_batch_on_this_cp_rank({k: microbatch[k] for k in ("tokens", "position_ids")})
    output = model(
        local["tokens"],
        local["position_ids"],
        readout_index_B=microbatch["readout_index"],
        injection=microbatch.get("injection"),
    )
    if "target" in microbatch:
        return output, partial(ar_loss, microbatch["target"], mse_scale)
    return output, identity_output
