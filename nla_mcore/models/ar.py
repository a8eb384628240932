"""The AR (activation reconstructor): the first K+1 decoder layers and an identity-initialised head.

`ARModel` wraps one pipeline stage of a backbone built with `build_model(..., backbone_only=True)`
(no final norm, no LM head) and, on the last stage, a `Linear(d, d, bias=False)` value head
initialised to the identity (a random head costs ~0.3 of step-0 loss, NLA.md).  The prediction of
a sample is the head applied to the last decoder layer's output at the sample's last non-pad
token (`readout_index_B`, right padding).

Parallelism at the readout (`readout`):
* SP: the block's output is split along the sequence across TP ranks; it is all-gathered first
  (every TP rank then computes the same head output, so the head's weight gradient is already
  identical across TP ranks, like any replicated parameter's).
* CP: each CP rank holds two of the 2·cp chunks.  A sample's readout token lives on exactly one
  CP rank; that rank "owns" the sample: it returns the prediction and `owned_B` marks it.  Losses
  count owned samples only (`ar_loss`), so summing over CP ranks (DDP's dp·cp reduction and the
  token-count normalisation of `calculate_per_token_loss`) counts every sample exactly once.
Legend: S sequence (local), B batch, H hidden.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)

from nla_mcore.models.attention import cp_chunk_positions

VALUE_HEAD = "value_head.weight"


class ARModel(MegatronModule):
    """One pipeline stage of the AR: backbone stage (+ value head on the last stage)."""

    def __init__(self, backbone, *, is_last_stage: bool | None = None):
        super().__init__(config=backbone.config)
        self.backbone = backbone
        self.model_type = backbone.model_type  # read by Megatron-Core's schedules
        # read by finalize_model_grads under PP (the AR ties no output layer to its embedding)
        self.pre_process = backbone.pre_process
        self.share_embeddings_and_output_weights = backbone.share_embeddings_and_output_weights
        self.is_last_stage = ps.is_pipeline_last_stage() if is_last_stage is None else is_last_stage
        self.value_head = None
        if self.is_last_stage:
            d = self.config.hidden_size
            device = next(backbone.parameters()).device
            self.value_head = torch.nn.Linear(
                d, d, bias=False, dtype=self.config.params_dtype, device=device
            )
            with torch.no_grad():
                self.value_head.weight.copy_(torch.eye(d, dtype=self.config.params_dtype))

    def set_input_tensor(self, input_tensor) -> None:
        self.backbone.set_input_tensor(input_tensor)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The backbone's entries under the base model's checkpoint keys (no `backbone.`), so an
        AR checkpoint reads like a truncated base model plus `value_head.weight`."""
        inner = self.backbone.sharded_state_dict(prefix, sharded_offsets, metadata)
        sharded = {f"backbone.{k}": v for k, v in inner.items()}
        if self.value_head is not None:
            metadata = ensure_metadata_has_dp_cp_group(metadata)
            sharded.update(
                make_sharded_tensors_for_checkpoint(
                    {"weight": self.value_head.weight},
                    f"{prefix}value_head.",
                    {},
                    sharded_offsets,
                    tp_group=ps.get_tensor_model_parallel_group(),
                    dp_cp_group=metadata["dp_cp_group"],
                )
            )
        return sharded

    def forward(self, input_ids, position_ids, *, readout_index_B, injection=None):
        """Last stage: (prediction [B, H], owned [B] bool); other stages: hidden states."""
        hidden_SBH = self.backbone(input_ids, position_ids, None, injection=injection)
        if not self.is_last_stage:
            return hidden_SBH
        h_BH, owned_B = readout(
            hidden_SBH,
            readout_index_B,
            sequence_parallel=self.config.sequence_parallel,
            tp_group=ps.get_tensor_model_parallel_group(),
            cp_group=ps.get_context_parallel_group(),
        )
        return self.value_head(h_BH), owned_B


def readout(hidden_SBH, index_B, *, sequence_parallel: bool, tp_group, cp_group):
    """Hidden state at each sample's global position `index_B` (zeros where not owned)."""
    if sequence_parallel:
        hidden_SBH = gather_from_sequence_parallel_region(
            hidden_SBH, tensor_parallel_output_grad=False, group=tp_group
        )
    s, b = hidden_SBH.shape[:2]
    cp = cp_group.size() if cp_group is not None else 1
    if cp == 1:
        positions_S = torch.arange(s, device=hidden_SBH.device)
    else:
        positions_S = cp_chunk_positions(s * cp, cp, cp_group.rank(), hidden_SBH.device)
    match_SB = positions_S[:, None] == index_B.to(hidden_SBH.device)[None, :]
    owned_B = match_SB.any(dim=0)
    local_B = match_SB.int().argmax(dim=0)
    h_BH = hidden_SBH[local_B, torch.arange(b, device=hidden_SBH.device)]
    return h_BH * owned_B[:, None].to(h_BH.dtype), owned_B


def ar_loss(target_BD: torch.Tensor, mse_scale: float | None, output):
    """Megatron-Core loss_func for AR SFT: (sum of mse_nrm over owned samples, count, report)."""
    from nla_mcore.kernels import normalized_mse

    pred_BD, owned_B = output
    mse_B = normalized_mse(pred_BD, target_BD, pred_scale=mse_scale, target_scale=mse_scale)
    weight_B = owned_B.to(mse_B.dtype)
    total = (mse_B * weight_B).sum()
    count = weight_B.sum()
    return total, count.to(torch.int), {"ar_mse": torch.stack([total.detach(), count.detach()])}
