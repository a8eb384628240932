"""Dataset sidecars (``{parquet}.nla_meta.yaml``, ``kind: nla_dataset``): read, validate and write
them, and what a split built for training needs beyond a ``base`` one (the marker ids and the
templates; an ``ar_sft`` split also its AR suffix).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from nla_mcore.sidecar.parse import (
    _check_kind,
    _provenance_to_dict,
    _read_choice,
    _read_provenance,
    _read_templates,
    _read_tokens,
    _Section,
    _templates_to_dict,
    _tokens_to_dict,
)
from nla_mcore.sidecar.schema import (
    _DATASET_STAGE_NAMES,
    DATASET_KIND,
    SCHEMA_VERSION,
    DatasetExtraction,
    DatasetSidecar,
)
from nla_mcore.sidecar.yaml_io import _load_yaml, _write_yaml_atomically, dataset_sidecar_path


def read_dataset_sidecar(parquet_path: str | Path) -> DatasetSidecar:
    """Read and validate the sidecar of the parquet file ``parquet_path``."""
    path = dataset_sidecar_path(parquet_path)
    return dataset_sidecar_from_dict(_load_yaml(path), source=str(path))


def write_dataset_sidecar(parquet_path: str | Path, sidecar: DatasetSidecar) -> Path:
    """Validate ``sidecar`` and write it atomically to ``{parquet_path}.nla_meta.yaml``."""
    path = dataset_sidecar_path(parquet_path)
    data = dataset_sidecar_to_dict(sidecar)
    dataset_sidecar_from_dict(copy.deepcopy(data), source=f"{path} (being written)")
    _write_yaml_atomically(path, data)
    return path


def dataset_sidecar_from_dict(raw: dict[str, Any], source: str = "<dict>") -> DatasetSidecar:
    """Validate a parsed dataset sidecar (``source`` names it in errors)."""
    top = _Section(raw, source)
    _check_kind(top, DATASET_KIND)
    stage = _read_choice(top, "stage", _DATASET_STAGE_NAMES, required=True)
    templates = top.optional_section("prompt_templates")
    sidecar = DatasetSidecar(
        stage=stage,
        row_count=top.required_int("row_count"),
        extraction=_read_dataset_extraction(top.section("extraction")),
        tokens=_read_tokens(top.optional_section("tokens")),
        prompt_templates=None if templates is None else _read_templates(templates, None),
        api_summaries=top.get("api_summaries"),
        parent_datasets=top.get("parent_datasets") or [],
        provenance=_read_provenance(top),
    )
    top.get("schema_version")  # informational; files are always written as SCHEMA_VERSION
    _check_dataset_stage_needs(top, sidecar)
    sidecar.extra = top.rest()
    return sidecar


def dataset_sidecar_to_dict(sidecar: DatasetSidecar) -> dict[str, Any]:
    """The YAML mapping of ``sidecar`` in the layout this project writes."""
    ext = sidecar.extraction
    data: dict[str, Any] = {
        "kind": DATASET_KIND,
        "schema_version": SCHEMA_VERSION,
        "stage": sidecar.stage,
        "row_count": sidecar.row_count,
        "extraction": {
            "base_model": ext.base_model,
            "d_model": ext.d_model,
            "layer_index": ext.layer_index,
            "norm": ext.norm,
            "corpus": ext.corpus,
            "corpus_slice": ext.corpus_slice,
            "positions_per_doc": ext.positions_per_doc,
            **ext.extra,
        },
    }
    if sidecar.tokens is not None:
        data["tokens"] = _tokens_to_dict(sidecar.tokens)
    if sidecar.prompt_templates is not None:
        data["prompt_templates"] = _templates_to_dict(sidecar.prompt_templates)
    if sidecar.api_summaries is not None:
        data["api_summaries"] = dict(sidecar.api_summaries)
    data["parent_datasets"] = list(sidecar.parent_datasets)
    data.update(_provenance_to_dict(sidecar.provenance))
    return {**data, **sidecar.extra}


def _read_dataset_extraction(section: _Section) -> DatasetExtraction:
    norm = section.get("norm") or "none"
    if norm != "none":
        raise section.error(
            "norm", f"{norm!r} is not supported: datasets store raw vectors (norm: none)"
        )
    extraction = DatasetExtraction(
        base_model=section.as_str("base_model", section.require("base_model")),
        d_model=section.required_int("d_model", minimum=1),
        layer_index=section.required_int("layer_index"),
        corpus=section.get("corpus"),
        corpus_slice=section.get("corpus_slice"),
    )
    if section.get("positions_per_doc") is not None:
        extraction.positions_per_doc = section.required_int("positions_per_doc", minimum=1)
    extraction.extra = section.rest()
    return extraction


def _check_dataset_stage_needs(top: _Section, sidecar: DatasetSidecar) -> None:
    """Splits built for training need the marker ids and templates; AR-SFT needs its suffix."""
    if sidecar.stage == "base":
        return
    if sidecar.tokens is None:
        raise top.error("tokens", f"required for a {sidecar.stage} dataset")
    if sidecar.prompt_templates is None:
        raise top.error("prompt_templates", f"required for a {sidecar.stage} dataset")
    if sidecar.stage == "ar_sft" and sidecar.tokens.critic_suffix_ids is None:
        raise top.error("tokens.critic_suffix_ids", "required for an ar_sft dataset")
