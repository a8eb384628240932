"""The native rollout engine: generation on the trainer's own Megatron-Core modules and weights.

No copy of the weights and no server: the AV being trained generates its own rollouts, so a
policy step is visible to the next rollout at no cost.  The KV cache is Megatron-Core's
`StaticInferenceContext` (a preallocated [S + T, N, G, H] buffer per layer, written by
`SelfAttention` itself), created per call and dropped at its end, so training gets the memory
back between rollouts.

* **Prefill** runs the B prompts once, with the injection table (the virtual ids of
  `models.injection.inject`); the n samples of a prompt then share it: its K/V rows are copied
  into its n cache slots instead of recomputing them.
* **Decode** feeds one token per sample per step; stop detection stays on the device (a
  `finished` mask; finished samples keep emitting their last token with log-prob 0), and the
  host reads the mask only every `host_check_every` steps to end the loop early.
* **Sampling** (`sample.next_tokens`) uses one generator seeded from `params.seed`; under tensor
  parallelism every rank gathers the full logits and the chosen ids are broadcast from TP rank
  0, so all ranks feed the same tokens.

Why not Megatron-Core's `StaticInferenceEngine` / `TextGenerationController`: they take
prompts as text or plain ids and build their own embeddings, so the injection table cannot
reach the embedding stage, and they re-prefill every sample.  The KV context they use is
reused here.  Pipeline-parallel training layouts decode pipelined (see `_receive_hidden`).
Not yet here (the engine issue's GPU half): CUDA graphs for decode, a fixed-shape cache read
(Megatron-Core slices the cache to the current length, which changes shapes every step),
sequence parallelism (refused with a message).
Legend: B prompts, S prompt length, N = B·n samples, T new tokens, V vocabulary, D width.
"""

from __future__ import annotations

import time

import torch

from nla_mcore.rl.rollout.interface import (
    FINISH_LENGTH,
    FINISH_STOP,
    Rollout,
    SamplingParams,
)
from nla_mcore.rl.rollout.sample import next_tokens


class NativeEngine:
    """Generates with `model` (this rank's `NLAGPTModel`, optionally DDP-wrapped)."""

    def __init__(self, model, *, vocab_size: int, host_check_every: int = 8):
        self.model = _unwrap(model)
        self.vocab_size = vocab_size
        self.host_check_every = max(1, host_check_every)
        self._check_layout()

    def _check_layout(self) -> None:
        from megatron.core import parallel_state as ps

        config = self.model.config
        self.pipelined = ps.get_pipeline_model_parallel_world_size() > 1
        if self.pipelined and getattr(self.model, "vp_stage", None) is not None:
            raise NotImplementedError("the native engine does not decode virtual pipelines")
        if ps.get_context_parallel_world_size() > 1:
            raise NotImplementedError("the native engine does not generate under CP > 1")
        if config.sequence_parallel:
            raise NotImplementedError(
                "the native engine needs sequence_parallel off (its cache reads the last "
                "position of the full sequence)"
            )

    def generate(
        self, tokens_BS: torch.Tensor, injection_BD: torch.Tensor, params: SamplingParams
    ) -> Rollout:
        from megatron.core.inference.contexts import StaticInferenceContext

        device = next(self.model.parameters()).device
        tokens_BS = tokens_BS.to(device)
        injection_BD = injection_BD.to(device)
        b, s = tokens_BS.shape
        n, t_max = params.n, params.max_new_tokens
        samples = b * n
        context = StaticInferenceContext(max_batch_size=samples, max_sequence_length=s + t_max)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=device).manual_seed(params.seed)
        stop_ids = torch.tensor(list(params.stop_ids) or [-1], device=device)
        was_training = self.model.training
        self.model.eval()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # the rollout's own peak (stats)
        started = time.perf_counter()
        try:
            with torch.no_grad():
                positions_BS = torch.arange(s, device=device).expand(b, s)
                logits_BV = self._forward(tokens_BS, positions_BS, context, injection_BD)
                self._share_prefill(context, b, s, n)
                logits_NV = None if logits_BV is None else logits_BV.repeat_interleave(n, dim=0)
                context.sequence_len_offset = s
                prefill_s = time.perf_counter() - started
                out = self._decode(logits_NV, samples, context, s, params, generator, stop_ids)
        finally:
            context.key_value_memory_dict.clear()  # the cache goes back to training
            self.model.train(was_training)
        out.stats.update(prefill_s=prefill_s, decode_s=time.perf_counter() - started - prefill_s)
        if device.type == "cuda":
            out.stats["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        return out

    def _decode(self, logits_NV, n_samples, context, s, params, generator, stop_ids) -> Rollout:
        samples, t_max = n_samples, params.max_new_tokens
        device = next(self.model.parameters()).device
        tokens_NT = torch.zeros((samples, t_max), dtype=torch.long, device=device)
        logprobs_NT = torch.zeros((samples, t_max), dtype=torch.float32, device=device)
        finished_N = torch.zeros(samples, dtype=torch.bool, device=device)
        lengths_N = torch.zeros(samples, dtype=torch.long, device=device)
        last_N = torch.zeros(samples, dtype=torch.long, device=device)
        steps = 0
        for t in range(t_max):
            if logits_NV is not None:
                ids_N, logprob_N = next_tokens(logits_NV, params, generator)
                ids_N = self._same_on_tp_ranks(ids_N)
            else:  # an earlier pipeline stage: the last one samples
                ids_N = torch.empty(samples, dtype=torch.long, device=device)
                logprob_N = torch.empty(samples, dtype=torch.float32, device=device)
            if self.pipelined:
                self._from_last_stage(ids_N, logprob_N)
            ids_N = torch.where(finished_N, last_N, ids_N)
            tokens_NT[:, t] = ids_N
            logprobs_NT[:, t] = torch.where(finished_N, 0.0, logprob_N)
            lengths_N += (~finished_N).long()
            finished_N |= torch.isin(ids_N, stop_ids)
            last_N = ids_N
            steps = t + 1
            if t + 1 == t_max or ((t + 1) % self.host_check_every == 0 and finished_N.all()):
                break
            positions_N1 = torch.full((samples, 1), s + t, device=device)
            logits_NV = self._forward(ids_N[:, None], positions_N1, context, None)
            context.sequence_len_offset += 1
        stopped = finished_N.tolist()
        return Rollout(
            tokens_NT=tokens_NT[:, :steps],
            logprobs_NT=logprobs_NT[:, :steps],
            lengths_N=lengths_N,
            finish_reasons=[FINISH_STOP if f else FINISH_LENGTH for f in stopped],
            stats=dict(decode_steps=steps, kv_cache_bytes=_cache_bytes(context)),
        )

    def _forward(self, ids_BS, positions_BS, context, injection_BD) -> torch.Tensor | None:
        """[B, V] float32 logits of the last position (full vocabulary on every TP rank); under
        pipeline parallelism only the last stage has them (the others return None)."""
        if self.pipelined:
            self._receive_hidden(ids_BS.shape, context)
        out = self.model(
            ids_BS,
            positions_BS,
            None,
            injection=injection_BD,
            inference_context=context,
            runtime_gather_output=True,
        )
        if self.pipelined and not self._last_stage():
            self._send_hidden(out)
            return None
        return out[:, -1, : self.vocab_size].float()

    # --- pipeline-parallel training layouts: a pipelined decode ------------------------------
    # Each stage keeps its own layers' KV cache; per forward, stage i receives the previous
    # stage's hidden states [S, B, H], runs its layers and sends them on; the last stage
    # samples, and the chosen ids and log-probs are broadcast to every stage, so all ranks
    # hold the same rollout.  Stages idle while others compute (one micro-batch in flight):
    # the simple, exact choice for layouts that train with PP; a TP-only replica would decode
    # faster at the cost of regathering the weights every rollout.

    @staticmethod
    def _last_stage() -> bool:
        from megatron.core import parallel_state as ps

        return ps.is_pipeline_last_stage()

    def _receive_hidden(self, shape_BS, context) -> None:
        from megatron.core import parallel_state as ps

        if ps.is_pipeline_first_stage():
            return
        b, s = shape_BS
        config = self.model.config
        hidden_SBH = torch.empty(
            (s, b, config.hidden_size),
            dtype=config.params_dtype,
            device=next(self.model.parameters()).device,
        )
        torch.distributed.recv(hidden_SBH, src=ps.get_pipeline_model_parallel_prev_rank())
        self.model.set_input_tensor(hidden_SBH)

    @staticmethod
    def _send_hidden(hidden_SBH: torch.Tensor) -> None:
        from megatron.core import parallel_state as ps

        torch.distributed.send(
            hidden_SBH.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank()
        )

    def _from_last_stage(self, *tensors: torch.Tensor) -> None:
        """Broadcast `tensors` (filled on the last stage) to every pipeline stage, in place."""
        from megatron.core import parallel_state as ps

        for t in tensors:
            torch.distributed.broadcast(
                t,
                src=ps.get_pipeline_model_parallel_last_rank(),
                group=ps.get_pipeline_model_parallel_group(),
            )

    @staticmethod
    def _share_prefill(context, b: int, s: int, n: int) -> None:
        """Copy each prompt's cached K/V rows into the slots of its n samples (prompt-major)."""
        if n == 1:
            return
        for key_SNGH, value_SNGH in context.key_value_memory_dict.values():
            for cache in (key_SNGH, value_SNGH):
                cache[:s] = cache[:s, :b].repeat_interleave(n, dim=1)

    @staticmethod
    def _same_on_tp_ranks(ids_N: torch.Tensor) -> torch.Tensor:
        from megatron.core import parallel_state as ps

        if ps.get_tensor_model_parallel_world_size() > 1:
            torch.distributed.broadcast(
                ids_N,
                src=ps.get_tensor_model_parallel_src_rank(),
                group=ps.get_tensor_model_parallel_group(),
            )
        return ids_N


def _cache_bytes(context) -> int:
    return sum(
        t.numel() * t.element_size() for kv in context.key_value_memory_dict.values() for t in kv
    )


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model
