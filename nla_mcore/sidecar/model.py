"""Model sidecars (``{directory}/nla_meta.yaml``, ``kind: nla_model``): read, validate and write
them. The original's ``actor``/``critic`` roles, its ``"sqrt_d_model"`` scale and the layer
index under any of the spellings used over time (all that are present must agree) are read here.
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
    _MODEL_STAGE_NAMES,
    _ROLE_NAMES,
    MODEL_KIND,
    SCHEMA_VERSION,
    SQRT_D,
    Extraction,
    ModelSidecar,
    SidecarError,
)
from nla_mcore.sidecar.yaml_io import _load_yaml, _write_yaml_atomically, model_sidecar_path


def read_model_sidecar(directory: str | Path) -> ModelSidecar:
    """Read and validate the model sidecar of ``directory``."""
    path = model_sidecar_path(directory)
    return model_sidecar_from_dict(_load_yaml(path), source=str(path))


def write_model_sidecar(directory: str | Path, sidecar: ModelSidecar) -> Path:
    """Validate ``sidecar`` and write it atomically to ``{directory}/nla_meta.yaml``."""
    path = model_sidecar_path(directory)
    data = model_sidecar_to_dict(sidecar)
    model_sidecar_from_dict(copy.deepcopy(data), source=f"{path} (being written)")
    _write_yaml_atomically(path, data)
    return path


def model_sidecar_from_dict(raw: dict[str, Any], source: str = "<dict>") -> ModelSidecar:
    """Validate a parsed model sidecar (``source`` names it in errors)."""
    top = _Section(raw, source)
    _check_kind(top, MODEL_KIND)
    role = _read_role(top)
    d_model = top.required_int("d_model", minimum=1)
    extraction = top.section("extraction")
    critic = _Section(top.get("critic") or {}, source, "critic")
    layer_index = _read_layer_index(top, critic, extraction, role)
    tokens = _read_tokens(top.optional_section("tokens"))
    if role == "av" and tokens is None:
        raise top.error("tokens", "required for an AV (the injection marker and its neighbours)")
    top.get("schema_version")  # informational; files are always written as SCHEMA_VERSION
    sidecar = ModelSidecar(
        role=role,
        d_model=d_model,
        extraction=_read_model_extraction(extraction, role, d_model),
        prompt_templates=_read_templates(top.section("prompt_templates"), role),
        tokens=tokens,
        stage=_read_choice(top, "stage", _MODEL_STAGE_NAMES, required=False),
        base_checkpoint=top.get("base_checkpoint"),
        extraction_layer_index=layer_index,
        trained_on=top.get("trained_on"),
        parent_checkpoints=top.get("parent_checkpoints") or [],
        training=top.get("training") or {},
        provenance=_read_provenance(top),
        critic_extra=critic.rest(),
    )
    sidecar.extra = top.rest()  # after every known key has been read
    return sidecar


def model_sidecar_to_dict(sidecar: ModelSidecar) -> dict[str, Any]:
    """The YAML mapping of ``sidecar`` in the layout this project writes."""
    data: dict[str, Any] = {
        "kind": MODEL_KIND,
        "schema_version": SCHEMA_VERSION,
        "role": sidecar.role,
        "stage": sidecar.stage,
        "d_model": sidecar.d_model,
        "base_checkpoint": sidecar.base_checkpoint,
    }
    if sidecar.extraction_layer_index is not None:
        data["extraction_layer_index"] = sidecar.extraction_layer_index
    data["extraction"] = {
        "injection_scale": sidecar.extraction.injection_scale,
        "mse_scale": sidecar.extraction.mse_scale,
        **sidecar.extraction.extra,
    }
    if sidecar.tokens is not None:
        data["tokens"] = _tokens_to_dict(sidecar.tokens)
    data["prompt_templates"] = _templates_to_dict(sidecar.prompt_templates)
    critic = dict(sidecar.critic_extra)
    if sidecar.extraction_layer_index is not None:
        critic = {"extraction_layer_index": sidecar.extraction_layer_index, **critic}
    if critic:
        data["critic"] = critic
    data.update(
        trained_on=sidecar.trained_on,
        parent_checkpoints=list(sidecar.parent_checkpoints),
        training=dict(sidecar.training),
    )
    data.update(_provenance_to_dict(sidecar.provenance))
    return {**data, **sidecar.extra}


def _read_role(top: _Section) -> str:
    role = top.require("role")
    if role not in _ROLE_NAMES:
        raise top.error(
            "role", f"unknown role {role!r} (expected av or ar; the original's actor or critic)"
        )
    return _ROLE_NAMES[role]


def _read_model_extraction(section: _Section, role: str, d_model: int) -> Extraction:
    injection_scale = section.as_scale("injection_scale", section.get("injection_scale"), d_model)
    if role == "av" and injection_scale is None:
        raise section.error(
            "injection_scale",
            "required for an AV: the norm vectors are rescaled to before injection "
            "(a training hyper-parameter, e.g. 150 for Qwen2.5-7B L20)",
        )
    mse_scale = section.as_scale("mse_scale", section.get("mse_scale", SQRT_D), d_model)
    return Extraction(injection_scale=injection_scale, mse_scale=mse_scale, extra=section.rest())


def _read_layer_index(
    top: _Section, critic: _Section, extraction: _Section, role: str
) -> int | None:
    """K from any of the spellings used over time; all that are present must agree."""
    candidates = [
        (critic, "extraction_layer_index", 0),
        (top, "extraction_layer_index", 0),
        (extraction, "layer_index", 0),
    ]
    if role == "ar":  # a v1 AR records its depth K+1 instead of K
        candidates += [(critic, "num_hidden_layers", 1), (top, "num_hidden_layers", 1)]
    found: dict[str, int] = {}
    for section, key, depth_offset in candidates:
        if section.has(key):
            value = section.as_int(key, section.get(key), minimum=depth_offset)
            label = section.key_name(key) + (" - 1" if depth_offset else "")
            found[label] = value - depth_offset
    if len(set(found.values())) > 1:
        raise SidecarError(f"{top.source}: the layer index keys disagree: {found}")
    if role == "ar" and not found:
        raise critic.error(
            "extraction_layer_index",
            "required for an AR (its depth is K+1 decoder layers; v1 files: num_hidden_layers)",
        )
    return next(iter(found.values()), None)
