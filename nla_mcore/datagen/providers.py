"""Activation providers: the model behind the Extract stage.

    class ActivationProvider(Protocol):
        d_model: int
        layer: int   # K: the output of decoder block K (= HF hidden_states[K+1] for K < L-1)
        def activations(self, batch_token_ids, batch_positions) -> list[np.ndarray]  # [P_i, D] f32

The Extract driver (extract.py) owns everything else (corpus, positions, batching, files,
resume), so a provider is only "a forward pass to block K, read at these positions". The
Megatron-Core provider plugs in here; `HFActivationProvider` is the Hugging Face reference used by
the tests and as the baseline of benchmarks.

`HFActivationProvider` decisions:

- It reads the output of decoder block K with a forward hook and stops the forward pass there
  (a private exception carries the tensor out): blocks K+1.. and the LM head (a
  [B, T, vocab] tensor) are never computed. This is what `hidden_states[K+1]` of a full
  `output_hidden_states=True` forward gives for every K < L-1; for K = L-1 Hugging Face's last
  hidden state has the final norm applied, while NLA's vector is the block's own output, which
  this provider returns (a test pins both facts).
- Documents are right-padded with id 0 and masked; with causal attention, padding after a token
  cannot change it, so batching does not change the vectors beyond floating-point reassociation.
- The vectors come back as float32 numpy arrays whatever the model's dtype.

Legend: B = documents in a batch, T = padded length, P = positions of one document, D = d_model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from nla_mcore.prompts import default_extraction_layer


class ActivationProvider(Protocol):
    """Vectors of decoder block K at chosen positions, for a batch of token sequences.

    Called on every rank of a model-parallel group with the same batch in the same order; each
    returned array is `[len(batch_positions[i]), d_model]` float32. Ranks that do not write may
    return anything of that shape (the driver only checks it).
    """

    d_model: int
    layer: int

    def activations(
        self, batch_token_ids: list[list[int]], batch_positions: list[list[int]]
    ) -> list[np.ndarray]: ...


class _StopAfterBlock(Exception):
    """Raised by the hook on block K to end the forward pass; carries block K's output."""

    def __init__(self, hidden_BTD: torch.Tensor):
        super().__init__("stop after the extraction block")
        self.hidden_BTD = hidden_BTD


class HFActivationProvider:
    """Reference provider over a Hugging Face causal LM (a directory, hub id, or a model)."""

    def __init__(
        self,
        model_dir_or_model: str | Path | torch.nn.Module,
        layer: int | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        self.model = load_causal_lm(model_dir_or_model, device=device, dtype=dtype).eval()
        self.blocks = decoder_blocks(self.model)
        n_layers = len(self.blocks)
        self.layer = default_extraction_layer(n_layers) if layer is None else layer
        if not 0 <= self.layer < n_layers:
            raise ValueError(f"layer {self.layer} is outside the model's {n_layers} blocks")
        self.d_model = int(self.model.config.get_text_config().hidden_size)
        self.device = next(self.model.parameters()).device

    def activations(
        self, batch_token_ids: list[list[int]], batch_positions: list[list[int]]
    ) -> list[np.ndarray]:
        input_ids_BT, mask_BT = right_padded(batch_token_ids, self.device)
        hidden_BTD = self.block_output(input_ids_BT, mask_BT).float()
        return [
            hidden_BTD[i, torch.as_tensor(positions, device=self.device)].cpu().numpy()
            for i, positions in enumerate(batch_positions)
        ]

    @torch.inference_mode()
    def block_output(self, input_ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
        """Output of decoder block K, [B, T, D], computing nothing after it."""

        def stop(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            raise _StopAfterBlock(output[0] if isinstance(output, tuple) else output)

        handle = self.blocks[self.layer].register_forward_hook(stop)
        try:
            self.model(input_ids=input_ids_BT, attention_mask=mask_BT, use_cache=False)
        except _StopAfterBlock as stopped:
            return stopped.hidden_BTD
        finally:
            handle.remove()
        raise RuntimeError(f"decoder block {self.layer} never ran: its forward hook was not called")


def load_causal_lm(
    source: str | Path | torch.nn.Module,
    *,
    device: str | torch.device | None,
    dtype: torch.dtype | None,
) -> torch.nn.Module:
    if isinstance(source, torch.nn.Module):
        model = source
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype or "auto")
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device) if device is not None else model


def decoder_blocks(model: torch.nn.Module) -> Sequence[torch.nn.Module]:
    """The decoder layers of a causal LM (text decoder of a multimodal one, e.g. Gemma-3 12B)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    for candidate in (decoder, getattr(decoder, "language_model", None)):
        layers = getattr(candidate, "layers", None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise TypeError(f"cannot find the decoder layers of {type(model).__name__}")


def right_padded(
    batch_token_ids: list[list[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids padded with 0 after each sequence, and the [B, T] attention mask."""
    length = max(len(ids) for ids in batch_token_ids)
    input_ids_BT = torch.zeros((len(batch_token_ids), length), dtype=torch.long)
    mask_BT = torch.zeros_like(input_ids_BT)
    for row, ids in enumerate(batch_token_ids):
        input_ids_BT[row, : len(ids)] = torch.as_tensor(ids)
        mask_BT[row, : len(ids)] = 1
    return input_ids_BT.to(device), mask_BT.to(device)
