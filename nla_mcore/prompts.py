"""The NLA prompts, the injection marker, the explanation format and vector normalisation.

Everything here is a small pure function of a tokenizer (or a tensor), shared by datagen, the
trainers, the rollout engines and inference, so the token ids that training saw are the ids that
inference builds.

- **Marker.** The first code point in U+3200–U+33FF that ``tokenizer.encode`` (not
  ``convert_tokens_to_ids``: byte-level vocabularies key on byte strings) maps to exactly one
  non-UNK id. The range holds rare enclosed/squared CJK symbols that every supported vocabulary
  has some single tokens for, and that ordinary prompts never contain.
- **AV prompt.** One user message with the canonical text, rendered by the tokenizer's own chat
  template with ``add_generation_prompt=True`` in one step (``tokenize=True``): the templates of
  BOS families already contain the BOS, so a second ``encode`` of the rendered string would add a
  second one (the double-BOS failure mode). The marker must occur exactly once and not at an edge;
  its neighbours (``>`` of ``<concept>``, ``</`` of ``</concept>``) are recorded in the sidecar and
  checked at load.
- **AR prompt.** A plain string tokenised *with* special tokens (BOS for Llama/Gemma).
  ``ar_suffix_ids`` is the tail of every AR prompt: the suffix after ``{explanation}`` tokenised
  alone, minus its first token, which can merge with the explanation's last characters (as the
  original computes ``critic_suffix_ids``); it is verified against a few probe explanations.
- **Templates** are filled with ``str.replace`` on the one slot they carry, not ``str.format``,
  so a template may contain other braces.
- **normalize** computes the norm in fp32 (Gemma residual norms ~74k overflow fp16's sum of
  squares) and divides in fp32, returning the input dtype. The extra fp32 copy of the rows is the
  price of not rounding the scale factor to bf16.

Legend: N = number of vectors (any leading dims), D = model width d.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

MARKER_RANGE = range(0x3200, 0x3400)

INJECTION_SLOT = "{injection_char}"
EXPLANATION_SLOT = "{explanation}"
# The literal slot datagen writes into av_sft / rl prompt columns; replaced by the marker at load.
INJECT_PLACEHOLDER = "<INJECT>"

AV_PROMPT_TEMPLATE = (
    "You are a meticulous AI researcher conducting an important investigation into activation "
    "vectors from a language model. Your overall task is to describe the semantic content of that "
    "activation vector.\n"
    "\n"
    "We will pass the vector enclosed in <concept> tags into your context. You must then produce "
    "an explanation for the vector, enclosed within <explanation> tags. The explanation consists "
    "of 2-3 text snippets describing that vector.\n"
    "\n"
    "Here is the vector:\n"
    "\n"
    "<concept>{injection_char}</concept>\n"
    "\n"
    "Please provide an explanation."
)
AR_PROMPT_TEMPLATE = "Summary of the following text: <text>{explanation}</text> <summary>"

EXPLANATION_OPEN = "<explanation>"
EXPLANATION_CLOSE = "</explanation>"
_EXPLANATION_RE = re.compile(
    f"{re.escape(EXPLANATION_OPEN)}(.*?){re.escape(EXPLANATION_CLOSE)}", re.DOTALL
)

# Explanation endings the AR suffix must survive (letters, punctuation, digits, brackets, quotes).
_SUFFIX_PROBES = ("word", "a sentence.", "number 7", "(aside)", 'quoted "x"', "dash -", "colon:")


class PromptError(ValueError):
    """A prompt cannot be built as the NLA contract requires (marker count, slots, suffix)."""


@dataclass(frozen=True, slots=True)
class Marker:
    """The injection marker: one character that the tokenizer encodes as one id."""

    char: str
    token_id: int


@dataclass(frozen=True, slots=True)
class AVPrompt:
    """The canonical AV prompt ids with the marker position and its neighbour ids."""

    ids: tuple[int, ...]
    marker_pos: int
    left_id: int
    right_id: int


def tokenizer_name(tokenizer: Any) -> str:
    """A name for error messages: the path/hub id it was loaded from, else its class."""
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def select_marker(tokenizer: Any) -> Marker:
    """The first code point in U+3200–U+33FF that ``encode`` maps to exactly one non-UNK id."""
    unk_id = getattr(tokenizer, "unk_token_id", None)
    for code_point in MARKER_RANGE:
        ids = tokenizer.encode(chr(code_point), add_special_tokens=False)
        if len(ids) == 1 and ids[0] != unk_id:
            return Marker(char=chr(code_point), token_id=ids[0])
    raise PromptError(
        f"tokenizer {tokenizer_name(tokenizer)!r} encodes no code point in U+3200-U+33FF as a "
        "single non-UNK token; NLA needs one as the injection marker"
    )


def fill_slot(template: str, slot: str, value: str) -> str:
    """``template`` with its single ``slot`` replaced by ``value`` (error unless exactly one)."""
    count = template.count(slot)
    if count != 1:
        raise PromptError(f"template must contain {slot} exactly once, found {count}: {template!r}")
    return template.replace(slot, value)


def av_messages(marker_char: str, template: str = AV_PROMPT_TEMPLATE) -> list[dict[str, str]]:
    """The AV chat: one user message with the marker (or ``INJECT_PLACEHOLDER``) in the slot."""
    return [{"role": "user", "content": fill_slot(template, INJECTION_SLOT, marker_char)}]


def chat_prompt_ids(
    tokenizer: Any, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template, rendered in one step."""
    rendered = tokenizer.apply_chat_template(
        list(messages),
        tokenize=True,
        add_generation_prompt=add_generation_prompt,
        return_dict=False,
    )
    return _as_id_list(rendered)


def _as_id_list(rendered: Any) -> list[int]:
    """Flatten what ``apply_chat_template(tokenize=True)`` returns across transformers versions."""
    if hasattr(rendered, "keys"):
        rendered = rendered["input_ids"]
    if hasattr(rendered, "tolist"):
        rendered = rendered.tolist()
    if rendered and isinstance(rendered[0], list):
        if len(rendered) != 1:
            raise PromptError(f"expected one tokenised conversation, got {len(rendered)}")
        rendered = rendered[0]
    return [int(i) for i in rendered]


def av_prompt_ids(
    tokenizer: Any, marker_char: str, template: str = AV_PROMPT_TEMPLATE
) -> list[int]:
    """The canonical AV prompt's ids (chat template, generation prompt added)."""
    return chat_prompt_ids(tokenizer, av_messages(marker_char, template))


def marker_positions(ids: Sequence[int], token_id: int) -> list[int]:
    """Every position of ``token_id`` in ``ids``."""
    return [pos for pos, tid in enumerate(ids) if tid == token_id]


def build_av_prompt(tokenizer: Any, marker: Marker, template: str = AV_PROMPT_TEMPLATE) -> AVPrompt:
    """The canonical AV prompt; the marker must occur once, not first or last."""
    ids = av_prompt_ids(tokenizer, marker.char, template)
    positions = marker_positions(ids, marker.token_id)
    if len(positions) != 1:
        raise PromptError(
            f"marker {marker.char!r} (id {marker.token_id}) occurs {len(positions)} times in the "
            f"canonical AV prompt of {tokenizer_name(tokenizer)!r} (expected exactly 1)"
        )
    pos = positions[0]
    if not 0 < pos < len(ids) - 1:
        raise PromptError(f"marker at position {pos} is at an edge of the {len(ids)}-token prompt")
    return AVPrompt(ids=tuple(ids), marker_pos=pos, left_id=ids[pos - 1], right_id=ids[pos + 1])


def format_ar_prompt(explanation: str, template: str = AR_PROMPT_TEMPLATE) -> str:
    """The AR input text for ``explanation``."""
    return fill_slot(template, EXPLANATION_SLOT, explanation)


def ar_prompt_ids(
    tokenizer: Any, explanation: str, template: str = AR_PROMPT_TEMPLATE
) -> list[int]:
    """The AR input ids: tokenised *with* special tokens (BOS where the family has one)."""
    return list(tokenizer.encode(format_ar_prompt(explanation, template), add_special_tokens=True))


def ar_suffix_text(template: str = AR_PROMPT_TEMPLATE) -> str:
    """The part of the AR template after the explanation (``"</text> <summary>"``)."""
    fill_slot(template, EXPLANATION_SLOT, "")
    return template.split(EXPLANATION_SLOT, 1)[1]


def ar_suffix_ids(tokenizer: Any, template: str = AR_PROMPT_TEMPLATE) -> list[int]:
    """The ids every AR prompt ends with (``critic_suffix_ids``), checked on probe explanations."""
    suffix = ar_suffix_text(template)
    suffix_ids = list(tokenizer.encode(suffix, add_special_tokens=False))[1:]
    if not suffix_ids:
        raise PromptError(
            f"AR template has no stable suffix after {EXPLANATION_SLOT}: {template!r}"
        )
    for probe in _SUFFIX_PROBES:
        if ar_prompt_ids(tokenizer, probe, template)[-len(suffix_ids) :] != suffix_ids:
            raise PromptError(
                f"AR suffix ids {suffix_ids} of {tokenizer_name(tokenizer)!r} are not the tail of "
                f"the AR prompt for the explanation {probe!r}: the suffix merges with the text"
            )
    return suffix_ids


def format_av_target(explanation: str) -> str:
    """The AV's target response for ``explanation``."""
    return f"{EXPLANATION_OPEN}\n{explanation}\n{EXPLANATION_CLOSE}"


def parse_explanation(response: str) -> str | None:
    """The stripped text of the first ``<explanation>…</explanation>``; None if absent or empty.

    An empty explanation counts as unparseable: it gives the AR nothing to reconstruct from.
    """
    match = _EXPLANATION_RE.search(response)
    if match is None:
        return None
    return match.group(1).strip() or None


def normalize(vec_ND: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Rows rescaled to L2 norm ``scale`` (``None``: unchanged); zero rows stay zero.

    ``v / (max(‖v‖₂, 1e-12) / scale)`` with the norm and the division in fp32; result in the
    input dtype.
    """
    if scale is None:
        return vec_ND
    if not scale > 0:
        raise ValueError(f"normalize: scale must be positive or None, got {scale}")
    vec32_ND = vec_ND.float()
    norm_N1 = torch.linalg.vector_norm(vec32_ND, dim=-1, keepdim=True).clamp_min(1e-12)
    return (vec32_ND / (norm_N1 / scale)).to(vec_ND.dtype)


def default_mse_scale(d_model: int) -> float:
    """√d: with it the normalised MSE is 2(1 − cos), in [0, 4]."""
    return math.sqrt(d_model)


def default_extraction_layer(num_layers: int) -> int:
    """K = 2·L // 3, the default extraction block for a model with ``num_layers`` blocks."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return 2 * num_layers // 3
