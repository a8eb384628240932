"""What every rollout engine takes and returns (the native engine, TensorRT-LLM's).

An engine samples `n` continuations of each prompt.  Prompts arrive as the trainer builds them:
token ids in which each sample's marker is already a virtual id (`models.injection.inject`),
with the injection table of rescaled vectors.  It returns, per sample (prompt-major: the n
samples of prompt 0 first), the generated ids, each token's log-probability under the
distribution it was drawn from *before* top-k/top-p truncation (the temperature-scaled
softmax, which is what the trainer recomputes), the length and why it stopped.
Legend: B prompts, S prompt length, D width, N = B·n samples, T new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 150
    """NLA.md's RL response cap."""
    temperature: float = 1.0
    """0: greedy (log-probs are then of the untempered softmax)."""
    top_p: float = 1.0
    top_k: int = 0
    """0: no top-k cut."""
    stop_ids: tuple[int, ...] = ()
    """Generation of a sample ends at the first of these (it is kept, and counted in its length)."""
    n: int = 1
    """Samples per prompt; they share the prompt's prefill."""
    seed: int | None = None
    """Seeds the sampling generator: the same seed, prompts and weights give the same samples."""

    def __post_init__(self):
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} (>= 1)")
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} (>= 0)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} (in (0, 1])")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} (>= 0)")
        if self.n < 1:
            problems.append(f"n={self.n} (>= 1)")
        if problems:
            raise ValueError("invalid sampling parameters: " + ", ".join(problems))


@dataclass
class Rollout:
    """N = B·n samples, prompt-major."""

    tokens_NT: torch.Tensor
    """Generated ids, padded after each sample's end with its stop id (or the last token)."""
    logprobs_NT: torch.Tensor
    """float32; 0 after a sample's end."""
    lengths_N: torch.Tensor
    """Generated tokens per sample, the stop id included."""
    finish_reasons: list[str]
    """FINISH_STOP or FINISH_LENGTH per sample."""
    stats: dict = field(default_factory=dict)
    """Timings and sizes an engine reports (prefill_s, decode_s, peak_kv_bytes, ...)."""

    def sample_tokens(self, i: int) -> list[int]:
        return self.tokens_NT[i, : int(self.lengths_N[i])].tolist()


class RolloutEngine(Protocol):
    def generate(
        self, tokens_BS: torch.Tensor, injection_BD: torch.Tensor, params: SamplingParams
    ) -> Rollout:
        """Sample `params.n` continuations of each of the B prompts (equal lengths S)."""
        ...
