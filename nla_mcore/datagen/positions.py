"""Tokenise a document and choose the token positions whose vectors become rows.

    plan_document(doc_id, text, tokenizer, info, cfg) -> PlannedDoc | str   # str: skip reason

Rules (NLA.md "Data"):

- Tokenise with `tokenizer(text, add_special_tokens=True)`, truncated to `max_length` tokens:
  a BOS for families that have one (Llama, Gemma), none for Qwen, exactly as the base model was
  trained and as the AR tokenises its input.
- Eligible positions: index >= `min_position` (50) and not a special token (the BOS, or a special
  token written literally in the text). `positions_per_doc` (10) of them are drawn without
  replacement by `random.Random(int(sha256(f"{seed}|{doc_id}").hexdigest(), 16))` and sorted.
  The draw depends only on the seed, the id and the tokens, so any sharding, batch size or resume
  point gives the same rows. A document with fewer eligible positions keeps all of them; one
  with none is skipped as `too_short`.
- Only the tokens up to the last chosen position are kept for the forward pass (`token_ids`):
  attention is causal, so the vectors are the same and the work shrinks, often by half.
- `detokenized_text_truncated` is the document decoded up to and including the target token,
  without the prefix the tokenizer adds (the BOS), so the explainer sees only the document's text.
  `n_raw_tokens` is the number of tokens the model read up to and including it: `position + 1`.

Reproducibility relies on `random.Random.sample`'s algorithm, which is stable across CPython 3.x.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nla_mcore.datagen.datagen_config import ExtractConfig

TOO_SHORT = "too_short"


@dataclass(frozen=True, slots=True)
class TokenizerInfo:
    """What positions need to know about a tokenizer, computed once."""

    special_ids: frozenset[int]
    n_prefix: int
    """Tokens the tokenizer puts before every text (1 for a BOS family, 0 for Qwen)."""

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> TokenizerInfo:
        return cls(special_ids=special_token_ids(tokenizer), n_prefix=added_prefix(tokenizer))


@dataclass(frozen=True, slots=True)
class PlannedDoc:
    """A document ready for the model: its tokens up to the last position, and the positions."""

    index: int
    """Rank-local index of the document (its order in the shard's rows)."""
    doc_id: str
    token_ids: list[int]
    positions: list[int]
    n_tokens: int
    """Tokens of the (truncated) document, before trimming to the last position."""


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of every special token: the named roles plus added tokens flagged special."""
    ids = set(tokenizer.all_special_ids)
    for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return frozenset(ids)


def added_prefix(tokenizer: Any) -> int:
    """How many tokens `add_special_tokens=True` puts before the text (the BOS, if any)."""
    probe = "The cat sat on the mat."
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    with_specials = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(with_specials) - len(plain) + 1):
        if with_specials[start : start + len(plain)] == plain:
            return start
    raise ValueError(
        f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r}: add_special_tokens=True changes "
        "the text's own tokens, cannot locate the added prefix"
    )


def position_rng(seed: int, doc_id: str) -> random.Random:
    """The document's RNG: seeded by sha256(f"{seed}|{doc_id}") (NLA.md)."""
    digest = hashlib.sha256(f"{seed}|{doc_id}".encode()).hexdigest()
    return random.Random(int(digest, 16))


def eligible_positions(
    token_ids: Sequence[int], special_ids: frozenset[int], min_position: int
) -> list[int]:
    return [i for i in range(min_position, len(token_ids)) if token_ids[i] not in special_ids]


def choose_positions(
    doc_id: str, token_ids: Sequence[int], special_ids: frozenset[int], cfg: ExtractConfig
) -> list[int]:
    """Sorted positions for `doc_id` (empty when none is eligible)."""
    eligible = eligible_positions(token_ids, special_ids, cfg.min_position)
    count = min(cfg.positions_per_doc, len(eligible))
    return sorted(position_rng(cfg.seed, doc_id).sample(eligible, count))


def tokenize_document(tokenizer: Any, text: str, max_length: int) -> list[int]:
    encoded = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)
    return list(encoded["input_ids"])


def plan_document(
    index: int, doc_id: str, text: str, tokenizer: Any, info: TokenizerInfo, cfg: ExtractConfig
) -> PlannedDoc | str:
    """The planned document, or the reason (`too_short`) it yields no row."""
    token_ids = tokenize_document(tokenizer, text, cfg.max_length)
    positions = choose_positions(doc_id, token_ids, info.special_ids, cfg)
    if not positions:
        return TOO_SHORT
    return PlannedDoc(
        index=index,
        doc_id=doc_id,
        token_ids=token_ids[: positions[-1] + 1],
        positions=positions,
        n_tokens=len(token_ids),
    )


def truncated_text(tokenizer: Any, doc: PlannedDoc, position: int, info: TokenizerInfo) -> str:
    """The document decoded up to and including `position`, without the tokenizer's prefix."""
    return tokenizer.decode(doc.token_ids[info.n_prefix : position + 1])
