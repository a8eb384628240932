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
"""

from __future__ import annotations

import copy
import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from nla_mcore import prompts

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
_SECRET_KEY_RE = re.compile(
    r"api[_-]?key|secret|passw(or)?d|credential|auth[_-]?token|access[_-]?token|hf[_-]?token"
    r"|bearer|private[_-]?key",
    re.IGNORECASE,
)
_SECRET_VALUE_RE = re.compile(r"\bsk-ant-[\w-]{10,}|\bsk-[A-Za-z0-9]{20,}|\bhf_[A-Za-z0-9]{30,}")


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


# ---------------------------------------------------------------------------------------------
# Paths, reading and writing
# ---------------------------------------------------------------------------------------------


def model_sidecar_path(directory: str | Path) -> Path:
    """``{directory}/nla_meta.yaml``."""
    return Path(directory) / SIDECAR_BASENAME


def dataset_sidecar_path(parquet_path: str | Path) -> Path:
    """``{parquet_path}.nla_meta.yaml``."""
    parquet_path = Path(parquet_path)
    return parquet_path.with_name(parquet_path.name + SIDECAR_SUFFIX)


def read_model_sidecar(directory: str | Path) -> ModelSidecar:
    """Read and validate the model sidecar of ``directory``."""
    path = model_sidecar_path(directory)
    return model_sidecar_from_dict(_load_yaml(path), source=str(path))


def read_dataset_sidecar(parquet_path: str | Path) -> DatasetSidecar:
    """Read and validate the sidecar of the parquet file ``parquet_path``."""
    path = dataset_sidecar_path(parquet_path)
    return dataset_sidecar_from_dict(_load_yaml(path), source=str(path))


def write_model_sidecar(directory: str | Path, sidecar: ModelSidecar) -> Path:
    """Validate ``sidecar`` and write it atomically to ``{directory}/nla_meta.yaml``."""
    path = model_sidecar_path(directory)
    data = model_sidecar_to_dict(sidecar)
    model_sidecar_from_dict(copy.deepcopy(data), source=f"{path} (being written)")
    _write_yaml_atomically(path, data)
    return path


def write_dataset_sidecar(parquet_path: str | Path, sidecar: DatasetSidecar) -> Path:
    """Validate ``sidecar`` and write it atomically to ``{parquet_path}.nla_meta.yaml``."""
    path = dataset_sidecar_path(parquet_path)
    data = dataset_sidecar_to_dict(sidecar)
    dataset_sidecar_from_dict(copy.deepcopy(data), source=f"{path} (being written)")
    _write_yaml_atomically(path, data)
    return path


def _load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(
            f"no NLA sidecar at {path}: it ships beside the model's config.json "
            f"({SIDECAR_BASENAME}) or the parquet file (<file>{SIDECAR_SUFFIX})"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SidecarError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise SidecarError(
            f"{path}: expected a mapping at the top level, got {type(data).__name__}"
        )
    return data


class _SidecarDumper(yaml.SafeDumper):
    """Multi-line strings as ``|`` blocks, short lists of numbers inline."""


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


def _represent_list(dumper: yaml.SafeDumper, items: list) -> yaml.Node:
    inline = all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in items)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", items, flow_style=inline or None)


_SidecarDumper.add_representer(str, _represent_str)
_SidecarDumper.add_representer(list, _represent_list)


def _write_yaml_atomically(path: Path, data: dict[str, Any]) -> None:
    _reject_secrets(data, path)
    text = yaml.dump(data, Dumper=_SidecarDumper, sort_keys=False, allow_unicode=True, width=120)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as tmp:
            tmp.write(text)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _reject_secrets(data: Any, path: Path, where: str = "") -> None:
    """Refuse to write anything whose key or value looks like a credential."""
    if isinstance(data, dict):
        for key, value in data.items():
            dotted = f"{where}.{key}" if where else str(key)
            if _SECRET_KEY_RE.search(str(key)) and value not in (None, ""):
                raise SidecarError(f"{path}: refusing to write {dotted!r}: it looks like a secret")
            _reject_secrets(value, path, dotted)
    elif isinstance(data, list):
        for index, item in enumerate(data):
            _reject_secrets(item, path, f"{where}[{index}]")
    elif isinstance(data, str) and _SECRET_VALUE_RE.search(data):
        raise SidecarError(f"{path}: refusing to write {where!r}: its value looks like an API key")


# ---------------------------------------------------------------------------------------------
# Typed access to a parsed mapping: every error names the file and the dotted key
# ---------------------------------------------------------------------------------------------


class _Section:
    """One mapping of a sidecar; remembers which keys were read so the rest can be kept."""

    def __init__(self, raw: Any, source: str, prefix: str = ""):
        if not isinstance(raw, dict):
            raise SidecarError(
                f"{source}: {prefix or 'top level'}: expected a mapping, got {raw!r}"
            )
        self.raw, self.source, self.prefix, self.seen = raw, source, prefix, set()

    def key_name(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def error(self, key: str, message: str) -> SidecarError:
        return SidecarError(f"{self.source}: {self.key_name(key)}: {message}")

    def has(self, key: str) -> bool:
        return key in self.raw

    def get(self, key: str, default: Any = None) -> Any:
        self.seen.add(key)
        return self.raw.get(key, default)

    def require(self, key: str) -> Any:
        self.seen.add(key)
        if key not in self.raw or self.raw[key] is None:
            raise self.error(key, "required key is missing (or null)")
        return self.raw[key]

    def section(self, key: str) -> _Section:
        return _Section(self.require(key), self.source, self.key_name(key))

    def optional_section(self, key: str) -> _Section | None:
        return self.section(key) if self.get(key) is not None else None

    def rest(self) -> dict[str, Any]:
        return {k: v for k, v in self.raw.items() if k not in self.seen}

    def required_int(self, key: str, minimum: int = 0) -> int:
        return self.as_int(key, self.require(key), minimum)

    def as_int(self, key: str, value: Any, minimum: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(key, f"expected an integer >= {minimum}, got {value!r}")
        return value

    def as_str(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise self.error(key, f"expected a non-empty string, got {value!r}")
        return value

    def as_int_list(self, key: str, value: Any) -> list[int]:
        if not isinstance(value, list):
            raise self.error(key, f"expected a list of token ids, got {value!r}")
        return [self.as_int(key, item) for item in value]

    def as_scale(self, key: str, value: Any, d_model: int) -> float | None:
        """A positive number, ``"sqrt_d_model"`` (√d) or None."""
        if value is None:
            return None
        if value == SQRT_D:
            return math.sqrt(d_model)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise self.error(key, f"expected a positive number, {SQRT_D!r} or null, got {value!r}")
        return float(value)


# ---------------------------------------------------------------------------------------------
# Model sidecars
# ---------------------------------------------------------------------------------------------


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


def _check_kind(top: _Section, expected: str) -> None:
    kind = top.require("kind")
    if kind != expected:
        raise top.error("kind", f"expected {expected!r}, got {kind!r}")


def _read_role(top: _Section) -> str:
    role = top.require("role")
    if role not in _ROLE_NAMES:
        raise top.error(
            "role", f"unknown role {role!r} (expected av or ar; the original's actor or critic)"
        )
    return _ROLE_NAMES[role]


def _read_choice(top: _Section, key: str, names: dict[str, str], *, required: bool) -> str | None:
    value = top.require(key) if required else top.get(key)
    if value is None:
        return None
    if value not in names:
        raise top.error(
            key, f"unknown value {value!r} (expected one of {sorted(set(names.values()))})"
        )
    return names[value]


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


def _read_templates(section: _Section, role: str | None) -> PromptTemplates:
    """Both templates (either spelling); the one ``role`` uses is required."""
    templates = {}
    for ours, theirs, slot in (
        ("av", "actor", prompts.INJECTION_SLOT),
        ("ar", "critic", prompts.EXPLANATION_SLOT),
    ):
        text, key = _read_aliased(section, ours, theirs)
        if text is None and ours == role:
            raise section.error(
                ours, f"required for an {role.upper()} (or the original's {theirs!r})"
            )
        if text is not None and text.count(slot) != 1:
            raise section.error(key, f"must contain {slot} exactly once, found {text.count(slot)}")
        templates[ours] = text
    return PromptTemplates(**templates, extra=section.rest())


def _read_aliased(section: _Section, ours: str, theirs: str) -> tuple[str | None, str]:
    """The value under our key or the original's; both present must agree. Returns (value, key)."""
    mine, original = section.get(ours), section.get(theirs)
    if mine is not None and original is not None and mine != original:
        raise section.error(
            ours, f"{ours!r} and the original's {theirs!r} are both present and differ"
        )
    key = ours if mine is not None or original is None else theirs
    value = mine if mine is not None else original
    return (None if value is None else section.as_str(key, value)), key


def _read_tokens(section: _Section | None) -> Tokens | None:
    if section is None:
        return None
    tokens = Tokens(
        injection_char=section.as_str("injection_char", section.require("injection_char")),
        injection_token_id=section.required_int("injection_token_id"),
        injection_left_neighbor_id=section.required_int("injection_left_neighbor_id"),
        injection_right_neighbor_id=section.required_int("injection_right_neighbor_id"),
    )
    suffix = section.get("critic_suffix_ids")
    if suffix is not None:
        tokens.critic_suffix_ids = section.as_int_list("critic_suffix_ids", suffix)
    tokens.extra = section.rest()
    return tokens


def _read_provenance(top: _Section) -> Provenance:
    return Provenance(
        created_at=_as_text(top.get("created_at")),
        created_by=top.get("created_by"),
        git_commit=top.get("git_commit"),
    )


def _as_text(value: Any) -> str | None:
    """YAML turns unquoted timestamps into datetimes; keep them as the ISO text they were."""
    return value.isoformat() if isinstance(value, datetime) else value


def _tokens_to_dict(tokens: Tokens) -> dict[str, Any]:
    data: dict[str, Any] = {
        "injection_char": tokens.injection_char,
        "injection_token_id": tokens.injection_token_id,
        "injection_left_neighbor_id": tokens.injection_left_neighbor_id,
        "injection_right_neighbor_id": tokens.injection_right_neighbor_id,
    }
    if tokens.critic_suffix_ids is not None:
        data["critic_suffix_ids"] = list(tokens.critic_suffix_ids)
    return {**data, **tokens.extra}


def _templates_to_dict(templates: PromptTemplates) -> dict[str, Any]:
    data = {
        name: text
        for name, text in (("av", templates.av), ("ar", templates.ar))
        if text is not None
    }
    return {**data, **templates.extra}


def _provenance_to_dict(provenance: Provenance) -> dict[str, Any]:
    return {
        "created_at": provenance.created_at,
        "created_by": provenance.created_by,
        "git_commit": provenance.git_commit,
    }


# ---------------------------------------------------------------------------------------------
# Dataset sidecars
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Checks against the live tokenizer
# ---------------------------------------------------------------------------------------------


def make_tokens(
    tokenizer: Any,
    *,
    av_template: str = prompts.AV_PROMPT_TEMPLATE,
    ar_template: str | None = None,
) -> Tokens:
    """The ``tokens:`` section for ``tokenizer``: marker, neighbours, and the AR suffix if asked."""
    marker = prompts.select_marker(tokenizer)
    av_prompt = prompts.build_av_prompt(tokenizer, marker, av_template)
    suffix = None if ar_template is None else prompts.ar_suffix_ids(tokenizer, ar_template)
    return Tokens(
        injection_char=marker.char,
        injection_token_id=marker.token_id,
        injection_left_neighbor_id=av_prompt.left_id,
        injection_right_neighbor_id=av_prompt.right_id,
        critic_suffix_ids=suffix,
    )


def check_marker(sidecar: ModelSidecar | DatasetSidecar, tokenizer: Any) -> prompts.AVPrompt:
    """Verify the sidecar's marker against ``tokenizer``; return the canonical AV prompt.

    The marker must encode to exactly ``[injection_token_id]``, occur once (not at an edge) in the
    canonical prompt built from ``prompt_templates.av``, and have the recorded neighbours.
    Raises ``SidecarDriftError`` naming the field that drifted, with expected and found values.
    """
    tokens, template = _marker_fields(sidecar)
    name = prompts.tokenizer_name(tokenizer)
    char = tokens.injection_char
    slots = template.count(prompts.INJECTION_SLOT)
    if slots != 1:
        raise SidecarDriftError(
            f"prompt_templates.av drifted: it contains {prompts.INJECTION_SLOT} {slots} times "
            "(expected exactly once)"
        )
    found = list(tokenizer.encode(char, add_special_tokens=False))
    if found != [tokens.injection_token_id] or found[0] == getattr(tokenizer, "unk_token_id", None):
        raise SidecarDriftError(
            f"tokens.injection_token_id drifted: the sidecar expects {char!r} "
            f"({_code_point(char)}) to encode as [{tokens.injection_token_id}], "
            f"tokenizer {name!r} encodes it as {found}"
        )
    ids = prompts.av_prompt_ids(tokenizer, char, template)
    positions = prompts.marker_positions(ids, tokens.injection_token_id)
    if len(positions) != 1 or not 0 < positions[0] < len(ids) - 1:
        where = "at an edge" if len(positions) == 1 else f"{len(positions)} times"
        raise SidecarDriftError(
            f"prompt_templates.av drifted: the marker {char!r} (id {tokens.injection_token_id}) "
            f"occurs {where} in the canonical AV prompt of {name!r} (expected exactly once, inside)"
        )
    pos = positions[0]
    _check_neighbor(
        "injection_left_neighbor_id", tokens.injection_left_neighbor_id, ids[pos - 1], tokenizer
    )
    _check_neighbor(
        "injection_right_neighbor_id", tokens.injection_right_neighbor_id, ids[pos + 1], tokenizer
    )
    return prompts.AVPrompt(
        ids=tuple(ids), marker_pos=pos, left_id=ids[pos - 1], right_id=ids[pos + 1]
    )


def check_ar_suffix(sidecar: ModelSidecar | DatasetSidecar, tokenizer: Any) -> list[int]:
    """Verify ``tokens.critic_suffix_ids`` against ``tokenizer``; return the live suffix ids."""
    templates = sidecar.prompt_templates
    if templates is None or templates.ar is None:
        raise SidecarError("prompt_templates.ar: missing; cannot check the AR suffix")
    found = prompts.ar_suffix_ids(tokenizer, templates.ar)
    expected = None if sidecar.tokens is None else sidecar.tokens.critic_suffix_ids
    if expected is not None and expected != found:
        raise SidecarDriftError(
            f"tokens.critic_suffix_ids drifted: the sidecar expects {expected}, tokenizer "
            f"{prompts.tokenizer_name(tokenizer)!r} gives {found}"
        )
    return found


def _marker_fields(sidecar: ModelSidecar | DatasetSidecar) -> tuple[Tokens, str]:
    if sidecar.tokens is None:
        raise SidecarError("tokens: missing; cannot check the injection marker")
    if sidecar.prompt_templates is None or sidecar.prompt_templates.av is None:
        raise SidecarError("prompt_templates.av: missing; cannot check the injection marker")
    return sidecar.tokens, sidecar.prompt_templates.av


def _check_neighbor(key: str, expected: int, found: int, tokenizer: Any) -> None:
    if expected != found:
        tokens = tokenizer.convert_ids_to_tokens([expected, found])
        raise SidecarDriftError(
            f"tokens.{key} drifted: the sidecar expects {expected} ({tokens[0]!r}), the canonical "
            f"AV prompt of {prompts.tokenizer_name(tokenizer)!r} has {found} ({tokens[1]!r})"
        )


def _code_point(char: str) -> str:
    return " ".join(f"U+{ord(c):04X}" for c in char)


# ---------------------------------------------------------------------------------------------
# Provenance
# ---------------------------------------------------------------------------------------------


def utc_timestamp() -> str:
    """Now, UTC, ISO 8601 to the second (``2026-11-25T10:00:00+00:00``)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def created_by() -> str:
    """``"nla-mcore <version>"``."""
    try:
        return f"nla-mcore {version('nla-mcore')}"
    except PackageNotFoundError:
        return "nla-mcore (not installed)"


def git_commit(repo_dir: str | Path | None = None) -> str | None:
    """HEAD of the checkout this package runs from (or ``repo_dir``); None if there is none.

    Without ``repo_dir``, a HEAD is only reported when the package directory is the checkout's
    ``nla_mcore/`` (an installed copy inside some other repository reports None).
    """
    package_dir = Path(__file__).resolve().parent
    cwd = Path(repo_dir) if repo_dir is not None else package_dir
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "--verify", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = result.stdout.splitlines()
    if result.returncode != 0 or len(lines) != 2:
        return None
    toplevel, commit = lines
    if repo_dir is None and Path(toplevel).resolve() / "nla_mcore" != package_dir:
        return None
    return commit
