"""What a sidecar holds: the file names and schema constants, the original project's spellings
that are accepted (roles, stages), the two errors, and the dataclasses a validated sidecar
becomes (``ModelSidecar``, ``DatasetSidecar`` and their sections).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nla_mcore import prompts
from nla_mcore.sidecar.provenance import created_by, git_commit, utc_timestamp

SIDECAR_BASENAME = "nla_meta.yaml"
SIDECAR_SUFFIX = ".nla_meta.yaml"
SCHEMA_VERSION = 2
MODEL_KIND = "nla_model"
DATASET_KIND = "nla_dataset"
MODEL_STAGES = ("init", "sl", "rl")
DATASET_STAGES = ("base", "av_sft", "ar_sft", "rl")
SQRT_D = "sqrt_d_model"  # the original's spelling of "use √d_model" for a scale

_ROLE_NAMES = {"av": "av", "actor": "av", "ar": "ar", "critic": "ar"}
_MODEL_STAGE_NAMES = {"init": "init", "sl": "sl", "sft": "sl", "rl": "rl"}
_DATASET_STAGE_NAMES = {
    "base": "base",
    "av_sft": "av_sft",
    "actor_sft": "av_sft",
    "ar_sft": "ar_sft",
    "critic_sft": "ar_sft",
    "rl": "rl",
}


class SidecarError(ValueError):
    """A sidecar is missing a key, has a wrongly typed value, or contradicts itself."""


class SidecarDriftError(SidecarError):
    """A sidecar disagrees with the live tokenizer (marker id, neighbours, template, suffix)."""


@dataclass(kw_only=True, slots=True)
class Tokens:
    """Token ids pinned when the data/model was made (``tokens:``)."""

    injection_char: str
    injection_token_id: int
    injection_left_neighbor_id: int
    injection_right_neighbor_id: int
    critic_suffix_ids: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True, slots=True)
class PromptTemplates:
    """The AV user-message template (slot ``{injection_char}``), the AR one (``{explanation}``)."""

    av: str | None = prompts.AV_PROMPT_TEMPLATE
    ar: str | None = prompts.AR_PROMPT_TEMPLATE
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True, slots=True)
class Extraction:
    """A model's vector scales (``extraction:``): injection norm (AV) and MSE norm (None: raw)."""

    injection_scale: float | None
    mse_scale: float | None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True, slots=True)
class DatasetExtraction:
    """Where a dataset's vectors come from (``extraction:`` of a dataset sidecar)."""

    base_model: str
    d_model: int
    layer_index: int
    norm: str = "none"
    corpus: Any = None
    corpus_slice: Any = None
    positions_per_doc: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True, slots=True)
class Provenance:
    """Who wrote the file, when, from which commit (top-level keys of the sidecar)."""

    created_at: str | None = None
    created_by: str | None = None
    git_commit: str | None = None

    @classmethod
    def current(cls) -> Provenance:
        """Provenance of a file written now by this checkout."""
        return cls(created_at=utc_timestamp(), created_by=created_by(), git_commit=git_commit())


@dataclass(kw_only=True, slots=True)
class ModelSidecar:
    """``nla_meta.yaml`` of an AV or AR model directory (``kind: nla_model``)."""

    role: str
    d_model: int
    extraction: Extraction
    prompt_templates: PromptTemplates = field(default_factory=PromptTemplates)
    tokens: Tokens | None = None
    stage: str | None = None
    base_checkpoint: str | None = None
    extraction_layer_index: int | None = None
    trained_on: Any = None
    parent_checkpoints: list[Any] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)
    provenance: Provenance = field(default_factory=Provenance)
    critic_extra: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True, slots=True)
class DatasetSidecar:
    """``{parquet}.nla_meta.yaml`` of a dataset split (``kind: nla_dataset``)."""

    stage: str
    row_count: int
    extraction: DatasetExtraction
    tokens: Tokens | None = None
    prompt_templates: PromptTemplates | None = None
    api_summaries: dict[str, Any] | None = None
    parent_datasets: list[Any] = field(default_factory=list)
    provenance: Provenance = field(default_factory=Provenance)
    extra: dict[str, Any] = field(default_factory=dict)
