"""A sidecar against the live tokenizer: ``make_tokens`` builds the ``tokens:`` section for a
tokenizer; ``check_marker`` and ``check_ar_suffix`` verify a sidecar's marker, neighbours and AR
suffix, raising ``SidecarDriftError`` that names the field, because a drifted id silently
injects at the wrong position.
"""

from __future__ import annotations

from typing import Any

from nla_mcore import prompts
from nla_mcore.sidecar.schema import (
    DatasetSidecar,
    ModelSidecar,
    SidecarDriftError,
    SidecarError,
    Tokens,
)


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
