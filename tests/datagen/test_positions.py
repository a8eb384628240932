"""Position choice: BOS per family, index >= 50, no special tokens, seeded by (seed, doc_id)."""

from __future__ import annotations

import pytest
from datagen_toys import documents

from nla_mcore.datagen.datagen_config import ExtractConfig
from nla_mcore.datagen.positions import (
    TOO_SHORT,
    TokenizerInfo,
    choose_positions,
    plan_document,
    truncated_text,
)
from nla_mcore.toy_tokenizers import build_toy_tokenizer

CFG = ExtractConfig(positions_per_doc=10, max_length=300, batch_tokens=300)
LONG_DOC = documents(1, seed=3, max_paragraphs=1)[0] * 8


@pytest.mark.parametrize(("family", "n_prefix"), [("qwen2", 0), ("llama", 1), ("gemma3", 1)])
def test_bos_only_where_the_family_has_one(family, n_prefix):
    """Documents are tokenised as the base model saw text in training: a BOS for Llama and Gemma,
    none for Qwen (NLA.md). The text given to the explainer leaves that prefix out."""
    tokenizer = build_toy_tokenizer(family)
    info = TokenizerInfo.from_tokenizer(tokenizer)
    assert info.n_prefix == n_prefix
    doc = plan_document(0, "d", LONG_DOC, tokenizer, info, CFG)
    assert (doc.token_ids[0] == tokenizer.bos_token_id) == (n_prefix == 1)
    position = doc.positions[0]
    text = truncated_text(tokenizer, doc, position, info)
    assert text == tokenizer.decode(doc.token_ids[n_prefix : position + 1])
    assert LONG_DOC.startswith(text) and not text.startswith(tokenizer.bos_token or "<none>")
    # re-tokenising the text gives back exactly the n_raw_tokens = position + 1 tokens the model read
    assert len(tokenizer(text, add_special_tokens=True)["input_ids"]) == position + 1


def test_positions_are_eligible_seeded_and_sorted():
    """Positions are >= min_position, never a special token (here a literal <|eot_id|> in the
    text), sorted, and depend only on (seed, doc_id): the same under any sharding or resume."""
    tokenizer = build_toy_tokenizer("llama")
    info = TokenizerInfo.from_tokenizer(tokenizer)
    text = LONG_DOC[:200] + " <|eot_id|> " * 40 + LONG_DOC[200:]
    doc = plan_document(0, "doc-a", text, tokenizer, info, CFG)
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert sum(ids[50:300].count(t) for t in [eot]) > 0
    assert len(doc.positions) == 10 and doc.positions == sorted(set(doc.positions))
    assert all(50 <= p < 300 and ids[p] != eot for p in doc.positions)
    assert doc.token_ids == ids[: doc.positions[-1] + 1]
    again = plan_document(5, "doc-a", text, tokenizer, info, CFG)
    assert again.positions == doc.positions
    other_id = plan_document(0, "doc-b", text, tokenizer, info, CFG)
    other_seed = choose_positions("doc-a", ids, info.special_ids, ExtractConfig(seed=1))
    assert other_id.positions != doc.positions and other_seed != doc.positions


def test_short_documents_keep_what_they_have_or_are_skipped():
    """A document with fewer eligible tokens than N keeps them all; one with no token at index
    >= 50 is skipped as `too_short` (counted by the driver), never a crash."""
    tokenizer = build_toy_tokenizer("qwen2")
    info = TokenizerInfo.from_tokenizer(tokenizer)
    text = "model" + " model" * 52  # one token per word, no BOS in Qwen: 53 tokens
    assert len(tokenizer(text)["input_ids"]) == 53
    few = plan_document(0, "few", text, tokenizer, info, CFG)
    assert few.positions == [50, 51, 52]
    assert plan_document(0, "short", "model" + " model" * 39, tokenizer, info, CFG) == TOO_SHORT


def test_long_documents_are_truncated_to_max_length():
    """Positions come from the first max_length tokens only (4096 by default; 300 here)."""
    tokenizer = build_toy_tokenizer("gemma3")
    info = TokenizerInfo.from_tokenizer(tokenizer)
    doc = plan_document(0, "long", LONG_DOC * 4, tokenizer, info, CFG)
    assert doc.n_tokens == 300 and max(doc.positions) < 300
