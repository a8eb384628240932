"""`MCoreActivationProvider`: the Extract stage's model on Megatron-Core, under any TP/PP/CP layout.

    provider = MCoreActivationProvider.from_hf(hf_dir, layer=K, parallel=..., dtype="bfloat16")
    dp_rank, dp_size, is_writer = writer_rank_info()
    run_extract(cfg, provider, tokenizer, out_dir=..., dp_rank=dp_rank, dp_size=dp_size,
                is_writer=is_writer, agree_on_resume=agree_with_writer(dp_rank, is_writer))

Design decisions:

- **Only K+1 blocks exist.** The model is `make_recipe(..., num_layers=K+1)` built with
  `backbone_only=True` (no final norm, no LM head) and filled by `load_hf_weights`, which reads
  only the first K+1 layers' slices of the safetensors. The last stage's output is block K's
  output, which is NLA's vector (HF `hidden_states[K+1]`). Loading from an nla-mcore base
  checkpoint is not offered: it holds all L layers as stacked dist-checkpoint tensors, which a
  K+1-layer model cannot read without a custom sharded state dict; the HF directory it was made
  from loads just as fast.
- **Megatron-Core's schedule runs the forward** (`engine.forward_collect`, forward only), so
  pipeline parallelism is the real 1F1B schedule. A provider call is cut into `microbatches`
  equal micro-batches (default 1 without PP, 2·pp with PP, so the stages overlap); a short last
  micro-batch is filled with rows of padding whose outputs are dropped.
- **Right padding, one length per call**, rounded up to the multiple the layout needs
  (`2·cp` with CP, times `tp` with SP; see `runtime.parallel.validate_layout`) and to a
  multiple of 8 (`LENGTH_ALIGNMENT`, which also avoids odd lengths: see there). Attention is
  causal, so padding after a token never changes it, and the vectors equal an unpadded forward's
  up to floating-point reassociation.
- **The readout** runs in the output function on the last pipeline stage: with SP the block's
  output is all-gathered over TP (`gather_from_sequence_parallel_region`), with CP the 2·cp
  load-balanced chunks are all-gathered and put back in order (`attention.gather_cp_sequence`),
  then the requested positions are read. Gathering the whole [S, B, H] costs one all-gather of
  the batch's hidden states, small next to K+1 blocks of compute; reading only the owned
  positions and reducing would send less but needs an ownership map per position.
- **Only the last pipeline stage holds vectors.** Other stages return zero arrays of the right
  shape (the `ActivationProvider` protocol allows it for ranks that do not write) instead of a
  broadcast over the pipeline group: nothing would read them. `writer_rank_info()` therefore
  makes the writer of each data-parallel replica the rank at (last stage, tp 0, cp 0), and
  `holds_vectors` lets a caller check it.
- Weights in bfloat16 by default (float32 for exact comparisons); vectors come back float32.

Legend: B = documents in a micro-batch, S = padded length, H = d_model, N = positions read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from nla_mcore.prompts import default_extraction_layer
from nla_mcore.runtime.parallel import ParallelConfig

__all__ = [
    "MCoreActivationProvider",
    "ReadoutLayout",
    "agree_with_writer",
    "layout_pad_multiple",
    "writer_rank_info",
]


@dataclass(frozen=True)
class ReadoutLayout:
    """How the last stage's hidden states are split across ranks (what the readout must undo)."""

    sequence_parallel: bool
    tp_group: object
    cp_group: object

    @classmethod
    def current(cls, sequence_parallel: bool) -> ReadoutLayout:
        """The groups of this rank, from Megatron-Core's parallel state."""
        from megatron.core import parallel_state as ps

        return cls(
            sequence_parallel=sequence_parallel,
            tp_group=ps.get_tensor_model_parallel_group(),
            cp_group=ps.get_context_parallel_group(),
        )


class MCoreActivationProvider:
    """Vectors of decoder block K from a Megatron-Core model of K+1 blocks (any TP/PP/CP/SP)."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        layer: int,
        parallel: ParallelConfig,
        holds_vectors: bool,
        readout: ReadoutLayout,
        microbatches: int | None = None,
    ):
        self.model = model.eval()
        self.layer = layer
        self.d_model = int(model.config.hidden_size)
        self.parallel = parallel
        self.holds_vectors = holds_vectors
        self.readout = readout
        self.pad_multiple = layout_pad_multiple(parallel)
        self.microbatches = microbatches or default_microbatches(parallel)
        self.device = next(model.parameters()).device

    @classmethod
    def from_hf(
        cls,
        hf_dir: str | Path,
        *,
        layer: int | None = None,
        parallel: ParallelConfig,
        dtype: str = "bfloat16",
        backend: str = "auto",
        microbatches: int | None = None,
    ) -> MCoreActivationProvider:
        """Build blocks 0..K of the HF model in `hf_dir` on this rank and load their weights.

        Model-parallel groups must exist (`runtime.parallel.initialize_model_parallel`), and
        Megatron-Core's RNG tracker must be seeded (`runtime.distributed.set_seed`): no forward
        draws a random number, but the blocks fork the tracker under sequence parallelism."""
        from megatron.core import parallel_state as ps

        from nla_mcore.converters.hf_to_mcore import load_hf_weights
        from nla_mcore.models.build import build_model, make_recipe
        from nla_mcore.models.hf_config import load_hf_config

        hf = load_hf_config(hf_dir)
        layer = default_extraction_layer(hf.num_layers) if layer is None else layer
        if not 0 <= layer < hf.num_layers:
            raise ValueError(
                f"extract.layer={layer} is outside the model's blocks [0, {hf.num_layers - 1}]"
            )
        recipe = make_recipe(hf, parallel, dtype=dtype, backend=backend, num_layers=layer + 1)
        model = build_model(recipe, perform_initialization=False, backbone_only=True)
        load_hf_weights(model, hf_dir, recipe, backbone_only=True)
        return cls(
            model,
            layer=layer,
            parallel=parallel,
            holds_vectors=ps.is_pipeline_last_stage(),
            readout=ReadoutLayout.current(parallel.sequence_parallel),
            microbatches=microbatches,
        )

    def activations(
        self, batch_token_ids: list[list[int]], batch_positions: list[list[int]]
    ) -> list[np.ndarray]:
        """[P_i, H] float32 per document: block K's output at its positions (zeros off the last
        pipeline stage). Every rank of the model-parallel group must make the same call."""
        from nla_mcore.train.engine import forward_collect

        microbatches, seq_length = extraction_microbatches(
            batch_token_ids,
            batch_positions,
            multiple=self.pad_multiple,
            n_microbatches=self.microbatches,
            device=self.device,
        )
        step = partial(hidden_forward_step, readout=self.readout)
        with torch.no_grad():
            outputs = forward_collect(self.model, step, microbatches, seq_length=seq_length)
        counts = [len(positions) for positions in batch_positions]
        if not self.holds_vectors:
            return [np.zeros((n, self.d_model), np.float32) for n in counts]
        vec_NH = torch.cat(outputs).cpu().numpy()
        return np.split(vec_NH, np.cumsum(counts)[:-1])


# --- layout ------------------------------------------------------------------------------------


# Padded lengths are also a multiple of 8: a handful of pad tokens per call, fewer distinct
# kernel shapes, and no odd lengths, which SDPAttention's sliding-window mask cannot take at
# cp=1 (`attention.cp_chunk_positions` floors seq/2; Gemma-3 fails on an odd longest document).
LENGTH_ALIGNMENT = 8


def layout_pad_multiple(parallel: ParallelConfig) -> int:
    """Sequence lengths must be a multiple of this: 2·cp chunks with CP, times tp with SP (and
    of LENGTH_ALIGNMENT)."""
    cp = parallel.context_parallel
    tp_split = parallel.tensor_parallel if parallel.sequence_parallel else 1
    return math.lcm((2 * cp if cp > 1 else 1) * tp_split, LENGTH_ALIGNMENT)


def default_microbatches(parallel: ParallelConfig) -> int:
    """1 without PP (nothing to overlap); 2·pp with PP (pipeline busy for 2pp/(3pp-1) of a call)."""
    pp = parallel.pipeline_parallel
    return 1 if pp == 1 else 2 * pp


def writer_rank_info() -> tuple[int, int, bool]:
    """(dp_rank, dp_size, is_writer) of this rank: the writer of each data-parallel replica is
    the rank that holds the vectors once, at (last pipeline stage, tp rank 0, cp rank 0)."""
    from megatron.core import parallel_state as ps

    is_writer = (
        ps.is_pipeline_last_stage()
        and ps.get_tensor_model_parallel_rank() == 0
        and ps.get_context_parallel_rank() == 0
    )
    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(), is_writer


def agree_with_writer(dp_rank: int, is_writer: bool) -> Callable[[int], int]:
    """`run_extract`'s `agree_on_resume`: every rank takes the done-shard count of its replica's
    writer. One all-gather over the world (once per run), so it needs no replica group."""

    def agree(n_done: int) -> int:
        mine = (dp_rank, is_writer, n_done)
        everyone: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, mine)
        writers = [n for rank, writes, n in everyone if writes and rank == dp_rank]
        if len(writers) != 1:
            raise RuntimeError(
                f"data-parallel replica {dp_rank} has {len(writers)} writer ranks, expected 1"
            )
        return writers[0]

    return agree


# --- one call ----------------------------------------------------------------------------------


def padded_length(longest: int, multiple: int) -> int:
    return math.ceil(longest / multiple) * multiple


def extraction_microbatches(
    batch_token_ids: list[list[int]],
    batch_positions: list[list[int]],
    *,
    multiple: int,
    n_microbatches: int,
    device: torch.device,
) -> tuple[list[dict], int]:
    """Equal micro-batches of right-padded documents (padding rows fill the last one), each with
    `tokens` [B, S], `position_ids` [B, S] and the positions to read as (`row_N`, `position_N`);
    and S."""
    n_docs = len(batch_token_ids)
    per_mb = math.ceil(n_docs / max(1, min(n_microbatches, n_docs)))
    n_mb = math.ceil(n_docs / per_mb)
    seq = padded_length(max(len(ids) for ids in batch_token_ids), multiple)
    tokens_BS = torch.zeros((n_mb * per_mb, seq), dtype=torch.long)
    for row, ids in enumerate(batch_token_ids):
        tokens_BS[row, : len(ids)] = torch.as_tensor(ids)
    tokens_BS = tokens_BS.to(device)
    position_ids_BS = torch.arange(seq, device=device).expand(per_mb, seq).contiguous()
    microbatches = []
    for k in range(n_mb):
        docs = range(k * per_mb, min((k + 1) * per_mb, n_docs))
        row_N = [doc - k * per_mb for doc in docs for _ in batch_positions[doc]]
        position_N = [p for doc in docs for p in batch_positions[doc]]
        microbatches.append(
            {
                "tokens": tokens_BS[k * per_mb : (k + 1) * per_mb],
                "position_ids": position_ids_BS,
                "row_N": torch.as_tensor(row_N, dtype=torch.long, device=device),
                "position_N": torch.as_tensor(position_N, dtype=torch.long, device=device),
            }
        )
    return microbatches, seq


def hidden_forward_step(data_iterator, model, *, readout: ReadoutLayout):
    """Megatron-Core forward_step_func: this rank's CP slice through its stage; on the last
    stage the output function reads the micro-batch's positions (`read_positions`)."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    microbatch = next(data_iterator)
    local = get_batch_on_this_cp_rank(
        {k: microbatch[k] for k in ("tokens", "position_ids")}, cp_group=readout.cp_group
    )
    hidden_SBH = model(local["tokens"], local["position_ids"], None)
    return hidden_SBH, partial(
        read_positions, microbatch["row_N"], microbatch["position_N"], readout
    )


def read_positions(
    row_N: torch.Tensor,
    position_N: torch.Tensor,
    readout: ReadoutLayout,
    hidden_SBH: torch.Tensor,
    non_loss_data: bool = False,
) -> torch.Tensor:
    """Output function: [N, H] float32 vectors at (position, row) of the whole sequence."""
    full_SBH = full_sequence(hidden_SBH, readout)
    return full_SBH[position_N, row_N].float()


def full_sequence(hidden_SBH: torch.Tensor, readout: ReadoutLayout) -> torch.Tensor:
    """Undo SP (all-gather over TP) and CP (all-gather, chunks back in order): [S, B, H]."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    from nla_mcore.models.attention import gather_cp_sequence

    if readout.sequence_parallel:
        hidden_SBH = gather_from_sequence_parallel_region(
            hidden_SBH, tensor_parallel_output_grad=False, group=readout.tp_group
        )
    return gather_cp_sequence(hidden_SBH, 0, readout.cp_group)
