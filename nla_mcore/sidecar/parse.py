"""Typed access to a parsed sidecar, shared by both kinds: ``_Section`` reads a mapping key by key
(every error names the file and the dotted key) and remembers what it read, so the keys it does
not know are kept; beside it the readers and writers of what model and dataset sidecars have in
common (``kind``, aliased choices, ``prompt_templates``, ``tokens``, provenance).
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from nla_mcore import prompts
from nla_mcore.sidecar.schema import SQRT_D, PromptTemplates, Provenance, SidecarError, Tokens

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
# Readers and writers of the sections both kinds share
# ---------------------------------------------------------------------------------------------


def _check_kind(top: _Section, expected: str) -> None:
    kind = top.require("kind")
    if kind != expected:
        raise top.error("kind", f"expected {expected!r}, got {kind!r}")


def _read_choice(top: _Section, key: str, names: dict[str, str], *, required: bool) -> str | None:
    value = top.require(key) if required else top.get(key)
    if value is None:
        return None
    if value not in names:
        raise top.error(
            key, f"unknown value {value!r} (expected one of {sorted(set(names.values()))})"
        )
    return names[value]


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
