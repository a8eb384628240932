"""Core attention for the local layer spec: SDPA with GQA, causal, sliding-window and CP.

Megatron-Core's stock `DotProductAttention` materialises the [b, np, s, s] score matrix with
`baddbmm` + a softmax kernel, refuses context parallelism, and measured 20-37 % slower than
transformers on an H100 (FINDINGS.md).  `torch.nn.functional.scaled_dot_product_attention`
picks flash / memory-efficient kernels on the GPU and a fused kernel on the CPU.

Context parallelism (CP) is done the way Llama 3 did it: every CP rank holds two of the
`2·cp` sequence chunks (`get_batch_on_this_cp_rank`'s load-balanced layout: rank r holds chunks
r and 2·cp−1−r), all-gathers K and V over the CP group (gradients reduce-scattered back), and
attends its local queries to all keys under a mask built from the *global* positions of both.
Trade-off: the gathered K/V are cp times larger than a ring exchange would hold; for the
sequence lengths NLA trains on (hundreds to a few thousand tokens) this is small next to the
activations, and it keeps attention a single SDPA call.

Masking: batches are right-padded and attention is causal, so pads never influence real
tokens; an explicit `attention_mask` is therefore refused rather than silently ignored.
Legend: S = local sequence, K = key sequence (gathered under CP), B = batch, N = query heads,
G = key/value heads, H = head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention


def cp_chunk_positions(seq_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global positions held by `cp_rank` under the load-balanced 2·cp chunk layout."""
    if cp_size == 1:
        return torch.arange(seq_len, device=device)  # also for odd lengths (no chunking)
    chunk = seq_len // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    mirror = 2 * cp_size - 1 - cp_rank
    second = torch.arange(mirror * chunk, (mirror + 1) * chunk, device=device)
    return torch.cat([first, second])


def gather_cp_sequence(local: torch.Tensor, seq_dim: int, cp_group) -> torch.Tensor:
    """All CP ranks' chunks of `local` (no grad), back in sequence order along `seq_dim`."""
    cp = cp_group.size() if cp_group is not None else 1
    if cp == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(cp)]
    torch.distributed.all_gather(parts, local.contiguous(), group=cp_group)
    full_len = local.shape[seq_dim] * cp
    order = torch.cat([cp_chunk_positions(full_len, cp, r, local.device) for r in range(cp)])
    gathered = torch.cat(parts, dim=seq_dim)
    return gathered.index_select(seq_dim, torch.argsort(order))


def causal_window_mask(
    q_pos_S: torch.Tensor, k_pos_K: torch.Tensor, window: int | None
) -> torch.Tensor:
    """Boolean [S, K] mask, True where query i may attend key j: causal, within `window` tokens.

    `window` follows Hugging Face's `sliding_window`: a query sees itself and the `window - 1`
    tokens before it.
    """
    delta_SK = q_pos_S[:, None] - k_pos_K[None, :]
    allowed_SK = delta_SK >= 0
    if window is not None:
        allowed_SK &= delta_SK < window
    return allowed_SK


class SDPAttention(MegatronModule):
    """Drop-in `core_attention` for Megatron-Core's `SelfAttention` (the CoreAttention protocol)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ):
        super().__init__(config=config)
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"SDPAttention supports causal masks only, got {attn_mask_type}")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.cp_group = pg_collection.cp
        self.layer_number = layer_number
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )
        self.window = None
        if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number
        ):
            left, right = config.window_size
            if right != 0:
                raise ValueError(
                    f"only causal sliding windows are supported, got {config.window_size}"
                )
            self.window = left + 1

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if (
            attention_mask is not None
            or attention_bias is not None
            or packed_seq_params is not None
        ):
            raise NotImplementedError(
                "SDPAttention takes right-padded batches under a causal mask only: pass "
                "attention_mask=None (padding cannot influence earlier tokens)."
            )
        q_SBNH, k_KBGH, v_KBGH = query, key, value
        cp_size = self.cp_group.size() if self.cp_group is not None else 1
        if cp_size > 1:
            k_KBGH = gather_from_sequence_parallel_region(k_KBGH.contiguous(), True, self.cp_group)
            v_KBGH = gather_from_sequence_parallel_region(v_KBGH.contiguous(), True, self.cp_group)
        if k_KBGH.shape[0] != q_SBNH.shape[0] * cp_size:  # generation with a KV cache
            if cp_size > 1:
                raise NotImplementedError("KV-cached generation under context parallelism")
            mask_SK, causal = self._cached_mask(q_SBNH.shape[0], k_KBGH.shape[0], q_SBNH.device)
        else:
            mask_SK = self._mask(q_SBNH.shape[0], cp_size, q_SBNH.device)
            causal = mask_SK is None
        out_BNSH = self._sdpa(q_SBNH, k_KBGH, v_KBGH, mask_SK, causal)
        s, b = q_SBNH.shape[:2]
        return out_BNSH.permute(2, 0, 1, 3).reshape(s, b, -1)

    def _mask(self, local_len: int, cp_size: int, device) -> torch.Tensor | None:
        """None when plain causal attention is exact (lets SDPA use its causal flash kernel)."""
        full_len = local_len * cp_size
        if cp_size == 1 and (self.window is None or self.window >= full_len):
            return None
        rank = self.cp_group.rank() if cp_size > 1 else 0
        q_pos = cp_chunk_positions(full_len, cp_size, rank, device)
        k_pos = torch.cat(
            [cp_chunk_positions(full_len, cp_size, r, device) for r in range(cp_size)]
        )
        return causal_window_mask(q_pos, k_pos, self.window)

    def _cached_mask(self, q_len: int, k_len: int, device) -> tuple[torch.Tensor | None, bool]:
        """(mask, is_causal) when the queries are the last `q_len` of `k_len` cached positions
        (SDPA's own causal mask is aligned to the first key, which is right only when
        q_len == k_len).  One query without a window sees every key: no mask at all."""
        if q_len == 1 and (self.window is None or self.window >= k_len):
            return None, False
        q_pos = torch.arange(k_len - q_len, k_len, device=device)
        return causal_window_mask(q_pos, torch.arange(k_len, device=device), self.window), False

    def _sdpa(self, q_SBNH, k_KBGH, v_KBGH, mask_SK, causal: bool) -> torch.Tensor:
        q_BNSH, k_BGKH, v_BGKH = (t.permute(1, 2, 0, 3) for t in (q_SBNH, k_KBGH, v_KBGH))
        dropout_p = self.dropout_p if self.training else 0.0
        kwargs = dict(
            attn_mask=mask_SK,
            is_causal=causal,
            scale=self.softmax_scale,
            enable_gqa=q_BNSH.shape[1] != k_BGKH.shape[1],
        )
        if dropout_p == 0.0 or self.config.sequence_parallel:
            return F.scaled_dot_product_attention(
                q_BNSH, k_BGKH, v_BGKH, dropout_p=dropout_p, **kwargs
            )
        # Heads are split across TP ranks: dropout masks must differ per rank (as Megatron does).
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return F.scaled_dot_product_attention(
                q_BNSH, k_BGKH, v_BGKH, dropout_p=dropout_p, **kwargs
            )
