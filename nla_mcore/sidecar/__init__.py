"""The ``nla_meta.yaml`` contract: read, validate and write model and dataset sidecars.

A model directory carries ``nla_meta.yaml`` beside ``config.json``; a dataset parquet carries
``{file}.nla_meta.yaml``. The sidecar pins what the weights were trained with: the injection
marker and its neighbour ids, the prompt templates, the scales, the extraction layer. Loaders
take these from the sidecar, never from code, and ``check_marker`` verifies them against the
live tokenizer, because a drifted id silently injects at the wrong position.

Design decisions and trade-offs:

- **Strict where it changes the computation, lenient where it is descriptive.** Role, ids,
  scales, ``d_model``, the layer index, ``norm`` and the templates are type-checked and
  cross-checked (errors name the file and the dotted key). Provenance, ``training``,
  ``trained_on``, parent lists, ``api_summaries``, corpus names are kept as written.
- **Files of the original project are read as they are.** Role ``actor``/``critic`` becomes
  ``av``/``ar``; template keys ``actor``/``critic`` become ``av``/``ar`` (both spellings present
  must agree); ``"sqrt_d_model"`` as a scale means √d; the layer index is taken from
  ``critic.extraction_layer_index``, top-level ``extraction_layer_index``,
  ``extraction.layer_index`` or, for a v1 AR, ``num_hidden_layers - 1`` (top level or under
  ``critic``), and all that are present must agree. Unknown keys, at the top level and inside each
  section, are kept and written back. Files are written in one layout (``schema_version: 2``,
  ``av``/``ar`` names, the layer index both at the top level and under ``critic``, which the
  original's loaders read), so a round trip normalises spellings but loses no information.
- **mse_scale**: absent means √d; an explicit ``null`` means "no rescale" (as in the original).
  An AV must carry a positive ``injection_scale``; an AR writes ``null``.
- **Writing is atomic** (temporary file in the same directory, fsync, rename), validates by
  re-reading what it is about to write, and refuses keys or values that look like credentials.

The package, by what each module holds:

- ``schema``: constants, accepted spellings, the errors and the dataclasses.
- ``yaml_io``: paths, YAML load/dump, the atomic write, the refusal of secrets.
- ``parse``: ``_Section`` (typed access, dotted keys in errors) and the readers/writers of the
  sections both kinds share.
- ``model`` / ``dataset``: read, validate and write each kind of sidecar.
- ``checks``: ``make_tokens``, ``check_marker`` and ``check_ar_suffix`` against a live tokenizer.
- ``provenance``: ``utc_timestamp``, ``created_by`` and ``git_commit``.
"""

from __future__ import annotations

from nla_mcore.sidecar.checks import check_ar_suffix, check_marker, make_tokens
from nla_mcore.sidecar.dataset import (
    dataset_sidecar_from_dict,
    dataset_sidecar_to_dict,
    read_dataset_sidecar,
    write_dataset_sidecar,
)
from nla_mcore.sidecar.model import (
    model_sidecar_from_dict,
    model_sidecar_to_dict,
    read_model_sidecar,
    write_model_sidecar,
)
from nla_mcore.sidecar.provenance import created_by, git_commit, utc_timestamp
from nla_mcore.sidecar.schema import (
    DATASET_KIND,
    DATASET_STAGES,
    MODEL_KIND,
    MODEL_STAGES,
    SCHEMA_VERSION,
    SIDECAR_BASENAME,
    SIDECAR_SUFFIX,
    SQRT_D,
    DatasetExtraction,
    DatasetSidecar,
    Extraction,
    ModelSidecar,
    PromptTemplates,
    Provenance,
    SidecarDriftError,
    SidecarError,
    Tokens,
)
from nla_mcore.sidecar.yaml_io import dataset_sidecar_path, model_sidecar_path

__all__ = [
    "SIDECAR_BASENAME",
    "SIDECAR_SUFFIX",
    "SCHEMA_VERSION",
    "MODEL_KIND",
    "DATASET_KIND",
    "MODEL_STAGES",
    "DATASET_STAGES",
    "SQRT_D",
    "SidecarError",
    "SidecarDriftError",
    "Tokens",
    "PromptTemplates",
    "Extraction",
    "DatasetExtraction",
    "Provenance",
    "ModelSidecar",
    "DatasetSidecar",
    "model_sidecar_path",
    "dataset_sidecar_path",
    "read_model_sidecar",
    "read_dataset_sidecar",
    "write_model_sidecar",
    "write_dataset_sidecar",
    "model_sidecar_from_dict",
    "model_sidecar_to_dict",
    "dataset_sidecar_from_dict",
    "dataset_sidecar_to_dict",
    "make_tokens",
    "check_marker",
    "check_ar_suffix",
    "utc_timestamp",
    "created_by",
    "git_commit",
]
