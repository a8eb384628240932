"""Explainers: the interface, answer parsing, and the deterministic offline explainer.

An explainer turns one text (a document decoded up to and including its target token) into an
`Answer`: either the plain explanation text or a failure reason. The AV target
`"<explanation>\\n{text}\\n</explanation>"` is built later from the plain text, so answers are
stored unwrapped.

Failure reasons are short codes, grouped in the run summary and written to `explain_failure`:

| reason | cause | cached |
|---|---|---|
| `refusal` | `stop_reason == "refusal"` | yes |
| `truncated` | `stop_reason == "max_tokens"` | yes |
| `context_window_exceeded` | `stop_reason == "model_context_window_exceeded"` | yes |
| `stop_<reason>` | any other unexpected stop reason | yes |
| `no_explanation_tags`, `empty_explanation`, `nested_tags` | the answer could not be parsed | yes |
| `empty_text` | the row's text is null or blank; no request is made | no |
| `rate_limited`, `overloaded`, `server_error`, `timeout`, `connection_error`, `malformed_response` | retries exhausted | no |
| `invalid_request`, `http_<status>` | the API rejected the request (e.g. 400) | no |
| `batch_errored`, `batch_expired`, `batch_canceled` | a batch result that was not a message | no |

Answers the model gave are cached even when they failed (a re-run would pay for the same answer
again); transport failures are not, so a re-run retries them.

Trade-off of the offline explainer: it is a template filled from the text (salient words, the text
just before the end, the final token), so it carries real, text-dependent signal for the quickstart
and tests, but it is no substitute for a model's explanations.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from nla_mcore.datagen.explain_config import TEXT_SLOT

_EXPLANATION_RE = re.compile(r"<explanation>(.*?)</explanation>", re.DOTALL)
_GOOD_STOPS = ("end_turn", "stop_sequence")
_STOP_FAILURES = {
    "refusal": "refusal",
    "max_tokens": "truncated",
    "model_context_window_exceeded": "context_window_exceeded",
}


class ExplainError(RuntimeError):
    """A problem that stops the run (bad key, unknown model, cost limit, batch still running).

    The message says what to set or do; it never contains the API key.
    """


@dataclass(slots=True)
class Answer:
    """One text's outcome: an explanation, or a failure reason (see the module table)."""

    explanation: str | None
    failure: str | None = None
    cacheable: bool = True
    input_tokens: int = 0
    output_tokens: int = 0
    raw: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None

    @classmethod
    def failed(cls, reason: str, *, cacheable: bool, **usage: int) -> Answer:
        return cls(explanation=None, failure=reason, cacheable=cacheable, **usage)


@dataclass(slots=True)
class CallStats:
    """HTTP requests an explainer sent (retries included) and how many of them were retries."""

    requests_sent: int = 0
    retries: int = 0


class Explainer(Protocol):
    """Anything that explains one text at a time; `model_id` goes into the cache key."""

    model_id: str
    stats: CallStats

    async def explain(self, text: str) -> Answer: ...

    async def aclose(self) -> None: ...


def build_user_message(instruction_prompt: str, text: str) -> str:
    """The prompt with the row's text in its `{text}` slot (`str.replace`: braces in texts are safe)."""
    return instruction_prompt.replace(TEXT_SLOT, text, 1)


def parse_explanation(raw: str) -> tuple[str | None, str | None]:
    """`(explanation, None)` from the first `<explanation>...</explanation>`, else `(None, reason)`."""
    match = _EXPLANATION_RE.search(raw)
    if match is None:
        return None, "no_explanation_tags"
    explanation = match.group(1).strip()
    if not explanation:
        return None, "empty_explanation"
    if "<explanation>" in explanation:
        return None, "nested_tags"
    return explanation, None


def answer_from_completion(
    raw: str, stop_reason: str | None, *, input_tokens: int = 0, output_tokens: int = 0
) -> Answer:
    """Judge a finished completion: stop reason first, then the tags."""
    usage = {"input_tokens": input_tokens, "output_tokens": output_tokens}
    if stop_reason not in _GOOD_STOPS:
        reason = _STOP_FAILURES.get(str(stop_reason), f"stop_{stop_reason}")
        return Answer(explanation=None, failure=reason, raw=raw, **usage)
    explanation, failure = parse_explanation(raw)
    return Answer(explanation=explanation, failure=failure, raw=raw, **usage)


def is_blank(text: str | None) -> bool:
    return text is None or not text.strip()


# --- offline explainer -------------------------------------------------------------------------

_STOPWORDS = frozenset(
    "about above after again against also among another because been before being below between "
    "both could does doing down during each every from further have having here into itself just "
    "more most much must once only other ought over same should some such than that their theirs "
    "them themselves then there these they this those through under until very were what when "
    "where which while will with within without would your yours".split()
)
_WORD_RE = re.compile(r"[A-Za-z][A-Za-z'-]{2,}[A-Za-z]")
_CODE_CHARS = frozenset("{}();=<>[]")
OFFLINE_MODEL_ID = "offline-v1"


@dataclass(slots=True)
class OfflineExplainer:
    """Deterministic, network-free explainer: the same text always gets the same answer."""

    model_id: str = OFFLINE_MODEL_ID
    stats: CallStats = field(default_factory=CallStats)

    async def explain(self, text: str) -> Answer:
        return answer_from_completion(offline_answer(text), "end_turn")

    async def aclose(self) -> None:
        return None


def offline_answer(text: str) -> str:
    """A 2-3 sentence explanation in the same tagged format a model is asked for."""
    topic = _salient_words(text)
    about = " and ".join(f'"{w}"' for w in topic) if topic else "no clear topic"
    tail = " ".join(text.split()[-8:])
    sentences = [
        f"The passage is {_register(text)} about {about}.",
        f'It has just reached "{tail}", so the next tokens most likely continue that phrase.',
        f"The final token {_final_token_description(text)}.",
    ]
    return "<explanation>\n" + " ".join(sentences) + "\n</explanation>"


def _salient_words(text: str, k: int = 2) -> list[str]:
    words = [w.lower() for w in _WORD_RE.findall(text)]
    counts = Counter(w for w in words if w not in _STOPWORDS)
    first_seen = {w: i for i, w in reversed(list(enumerate(words)))}
    ranked = sorted(counts, key=lambda w: (-counts[w], first_seen[w]))
    return ranked[:k]


def _register(text: str) -> str:
    if not text:
        return "empty"
    if sum(c in _CODE_CHARS for c in text) > 0.02 * len(text):
        return "code or markup"
    if sum(c.isdigit() for c in text) > 0.2 * len(text):
        return "mostly numeric"
    return "prose"


def _final_token_description(text: str) -> str:
    if not text.strip():
        return "is missing: the text is blank"
    if text[-1].isspace():
        return "is whitespace, ending a line or separating words"
    last = text.split()[-1][-20:]
    if last[-1].isdigit():
        return f'is part of the number "{last}"'
    if not last[-1].isalnum():
        return f'is the punctuation "{last[-1]}" closing "{last}"'
    return f'is the word or word piece "{last}", which the next token may extend'
