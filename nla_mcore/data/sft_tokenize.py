"""Token ids of the two SFT sets, built once before training (NLA.md "AV" / "AR").

* **AR.** The `prompt` string tokenised as a plain string *with* special tokens (the BOS of
  Llama/Gemma); it must end in the sidecar's `critic_suffix_ids` (the AR reads its vector at
  the last token), and the read-out is its last token.
* **AV.** The chat messages with `<INJECT>` replaced by the marker, through the tokenizer's chat
  template with the generation prompt, then the target: the `response` tokens and the
  template's end-of-turn token (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`), so that the AV
  learns to stop, for every family.  The template's tail is learnt once per distinct prompt by
  rendering a probe reply (prompt ids must be a prefix of the rendered conversation, else the
  template is refused); the end of turn is that tail up to its last special token (the newline
  some templates add after it is not supervised).  The first rows are re-rendered whole to
  check that prompt + response + end of turn equals the template's own tokenisation.
* The marker must occur exactly once in each prompt, with the sidecar's neighbours (checked
  here, so `models.injection.inject` cannot fail inside a step).

A sample longer than `max_length` is an error naming the file and row, or a counted skip.
The ids are kept flat (`ids` + `offsets`, CSR style): a million samples cost a few bytes each
beyond their tokens.  Legend: N samples, D vector width, T total tokens.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from nla_mcore import prompts
from nla_mcore.data.sft_files import DataError, SFTRows
from nla_mcore.sidecar import Tokens

_PROBE_REPLY = "probe"
_CHECKED_ROWS = 8


@dataclass(kw_only=True, slots=True)
class TokenizedSFT:
    """One tokenised SFT set: every kept sample's ids, vector and origin."""

    ids_T: np.ndarray
    """int32 [T]: the samples' ids end to end."""
    offsets: np.ndarray
    """int64 [N + 1]: sample i is ids_T[offsets[i]:offsets[i + 1]]."""
    vectors_ND: np.ndarray
    """float32 [N, D] raw activation vectors."""
    source: SFTRows
    """Where the samples come from (file, rows, doc ids), for messages."""
    keep_N: np.ndarray
    """int64 [N]: index into `source` of each sample."""
    prompt_lengths_N: np.ndarray | None = None
    """AV only: tokens of the prompt (the rest is the supervised target)."""
    skipped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.keep_N)

    @property
    def lengths_N(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sample_ids(self, i: int) -> np.ndarray:
        return self.ids_T[self.offsets[i] : self.offsets[i + 1]]

    def describe(self, i: int) -> str:
        """`file row r (doc_id ...)` of sample i."""
        return self.source.describe_row(int(self.keep_N[i]))

    def subset(self, samples_N: np.ndarray) -> TokenizedSFT:
        """The samples at `samples_N` (e.g. a held-out split), as a new set."""
        pieces = [self.sample_ids(int(i)) for i in samples_N]
        lengths = np.array([len(p) for p in pieces], dtype=np.int64)
        return TokenizedSFT(
            ids_T=np.concatenate(pieces) if pieces else np.zeros(0, np.int32),
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            vectors_ND=self.vectors_ND[samples_N],
            source=self.source,
            keep_N=self.keep_N[samples_N],
            prompt_lengths_N=None
            if self.prompt_lengths_N is None
            else self.prompt_lengths_N[samples_N],
        )


class _Collector:
    """Accumulates kept samples; a rejected row is an error or a counted skip."""

    def __init__(self, rows: SFTRows, *, max_length: int, skip: bool):
        self.rows, self.max_length, self.skip = rows, max_length, skip
        self.pieces: list[np.ndarray] = []
        self.keep: list[int] = []
        self.prompt_lengths: list[int] = []
        self.skipped: Counter = Counter()
        self.first_bad: dict[str, tuple[int, str]] = {}

    def reject(self, i: int, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        self.first_bad.setdefault(reason, (i, message))

    def add(self, i: int, ids: list[int], prompt_length: int = 0) -> None:
        if len(ids) > self.max_length:
            self.reject(
                i, "too_long", f"{len(ids)} tokens, more than data.max_length={self.max_length}"
            )
            return
        self.pieces.append(np.asarray(ids, dtype=np.int32))
        self.keep.append(i)
        self.prompt_lengths.append(prompt_length)

    def finish(self, with_prompts: bool) -> TokenizedSFT:
        if self.skipped and not self.skip:
            reason, (i, message) = next(iter(self.first_bad.items()))
            raise DataError(
                f"{self.rows.describe_row(i)}: {message} ({self.skipped[reason]} rows like "
                "this); set data.skip_bad_rows=true to drop such rows (they are counted)"
            )
        if not self.keep:
            raise DataError(f"{self.rows.path}: no usable rows left ({dict(self.skipped)})")
        lengths = np.array([len(p) for p in self.pieces], dtype=np.int64)
        keep = np.array(self.keep, dtype=np.int64)
        return TokenizedSFT(
            ids_T=np.concatenate(self.pieces),
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            vectors_ND=self.rows.vectors_ND[keep],
            source=self.rows,
            keep_N=keep,
            prompt_lengths_N=np.array(self.prompt_lengths, np.int64) if with_prompts else None,
            skipped=self.skipped,
        )


def tokenize_ar(
    rows: SFTRows, tokenizer, *, suffix_ids: list[int], max_length: int, skip: bool
) -> TokenizedSFT:
    """AR samples: the prompt with special tokens; it must end in `suffix_ids`."""
    collector = _Collector(rows, max_length=max_length, skip=skip)
    encoded = tokenizer(list(rows.prompts), add_special_tokens=True)["input_ids"]
    n = len(suffix_ids)
    for i, ids in enumerate(encoded):
        if list(ids[-n:]) != list(suffix_ids):
            collector.reject(
                i,
                "ar_suffix",
                f"the prompt's ids end in {list(ids[-n:])}, not the "
                f"sidecar's critic_suffix_ids {list(suffix_ids)}",
            )
            continue
        collector.add(i, ids)
    return collector.finish(with_prompts=False)


def tokenize_av(
    rows: SFTRows, tokenizer, *, tokens: Tokens, max_length: int, skip: bool
) -> TokenizedSFT:
    """AV samples: chat prompt with the marker, then response + end of turn (supervised)."""
    collector = _Collector(rows, max_length=max_length, skip=skip)
    templates: dict[str, tuple[list[int], list[int]]] = {}
    targets = tokenizer(list(rows.responses), add_special_tokens=False)["input_ids"]
    for i, (messages, target) in enumerate(zip(rows.prompts, targets, strict=True)):
        chat = _with_marker(messages, tokens.injection_char)
        key = repr(chat)
        if key not in templates:
            templates[key] = prompt_and_end_of_turn(tokenizer, chat, rows.describe_row(i))
        prompt_ids, end_of_turn = templates[key]
        problem = _marker_problem(prompt_ids, tokens)
        if problem:
            collector.reject(i, "marker", problem)
            continue
        ids = prompt_ids + list(target) + end_of_turn
        if i < _CHECKED_ROWS:
            _check_against_template(tokenizer, chat, rows.responses[i], ids, rows.describe_row(i))
        collector.add(i, ids, prompt_length=len(prompt_ids))
    return collector.finish(with_prompts=True)


def _with_marker(messages: list[dict], char: str) -> list[dict[str, str]]:
    return [
        {"role": m["role"], "content": m["content"].replace(prompts.INJECT_PLACEHOLDER, char)}
        for m in messages
    ]


def prompt_and_end_of_turn(tokenizer, chat, where: str) -> tuple[list[int], list[int]]:
    """The prompt's ids and the ids the template closes an assistant turn with."""
    prompt_ids = prompts.chat_prompt_ids(tokenizer, chat)
    probe = chat + [{"role": "assistant", "content": _PROBE_REPLY}]
    full = prompts.chat_prompt_ids(tokenizer, probe, add_generation_prompt=False)
    probe_ids = list(tokenizer.encode(_PROBE_REPLY, add_special_tokens=False))
    head, tail = full[: len(prompt_ids)], full[len(prompt_ids) :]
    if head != prompt_ids or tail[: len(probe_ids)] != probe_ids:
        raise DataError(
            f"{where}: the chat template of {prompts.tokenizer_name(tokenizer)!r} does not render "
            "an assistant reply after the generation prompt (the prompt ids are not a prefix of "
            "the conversation's): it cannot be used for AV training"
        )
    tail = tail[len(probe_ids) :]
    specials = special_ids(tokenizer)
    last = max((j for j, t in enumerate(tail) if t in specials), default=None)
    if last is None:
        raise DataError(
            f"{where}: the chat template of {prompts.tokenizer_name(tokenizer)!r} ends an "
            f"assistant turn with {tail} and no special token: no end of turn to learn"
        )
    return prompt_ids, tail[: last + 1]


def special_ids(tokenizer) -> set[int]:
    """Ids of every special token (the named ones and added tokens marked special)."""
    ids = set(getattr(tokenizer, "all_special_ids", []))
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(i for i, token in decoder.items() if getattr(token, "special", False))
    return ids


def _marker_problem(prompt_ids: list[int], tokens: Tokens) -> str | None:
    hits = prompts.marker_positions(prompt_ids, tokens.injection_token_id)
    if len(hits) != 1:
        return f"the prompt holds the marker {len(hits)} times (exactly one is required)"
    i = hits[0]
    if not 0 < i < len(prompt_ids) - 1:
        return "the marker is at the edge of the prompt"
    found = (prompt_ids[i - 1], prompt_ids[i + 1])
    expected = (tokens.injection_left_neighbor_id, tokens.injection_right_neighbor_id)
    if found != expected:
        return f"the marker's neighbours are ids {found}, the sidecar's are {expected}"
    return None


def _check_against_template(tokenizer, chat, response: str, ids: list[int], where: str) -> None:
    rendered = prompts.chat_prompt_ids(
        tokenizer, chat + [{"role": "assistant", "content": response}], add_generation_prompt=False
    )
    if rendered[: len(ids)] != ids:
        raise DataError(
            f"{where}: prompt + response + end of turn tokenised apart ({len(ids)} ids) differ "
            "from the chat template's rendering of the conversation: the response would be "
            "learnt with ids the model never sees at inference"
        )
