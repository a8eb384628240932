"""The toy tokenizers stand in for Qwen2.5, Llama-3 and Gemma-3 in every CPU test: they must
behave like the real families wherever NLA depends on tokenizer behaviour."""

from __future__ import annotations

import time
from functools import cache

import pytest
from transformers import AutoTokenizer

from nla_mcore.toy_tokenizers import FAMILIES, VOCAB_SIZE, build_toy_tokenizer, save_toy_tokenizer

USER_CHAT = [{"role": "user", "content": "Hello there."}]
FIRST_MARKER = {"qwen2": 0x320E, "llama": 0x33A1, "gemma3": 0x321C}


@cache
def toy(family: str):
    return build_toy_tokenizer(family)


def chat_ids(tokenizer, messages=USER_CHAT) -> list[int]:
    return tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_builds_fast_with_the_shared_vocab_size(family):
    """Tiny models use VOCAB_SIZE for every family, so each toy must have exactly that many ids;
    the brief caps a build at 1 s (all tests build them)."""
    start = time.perf_counter()
    tokenizer = build_toy_tokenizer(family)
    assert time.perf_counter() - start < 1.0
    assert len(tokenizer) == VOCAB_SIZE
    assert 1000 <= VOCAB_SIZE <= 2000
    assert max(tokenizer.get_vocab().values()) == VOCAB_SIZE - 1


@pytest.mark.parametrize("family", FAMILIES)
def test_build_is_deterministic(family):
    """Sidecars and golden files pin toy token ids, so two builds must be identical."""
    first = build_toy_tokenizer(family).backend_tokenizer.to_str()
    second = build_toy_tokenizer(family).backend_tokenizer.to_str()
    assert first == second


def test_unknown_family_is_refused():
    """A typo in a family name must fail loudly, naming the choices."""
    with pytest.raises(ValueError, match="qwen2"):
        build_toy_tokenizer("mistral")


@pytest.mark.parametrize(
    ("family", "bos", "eos", "pad"),
    [
        ("qwen2", None, "<|im_end|>", "<|endoftext|>"),
        ("llama", "<|begin_of_text|>", "<|eot_id|>", None),
        ("gemma3", "<bos>", "<end_of_turn>", "<pad>"),
    ],
)
def test_special_tokens_match_the_family(family, bos, eos, pad):
    """Code that handles BOS, EOS (the AV's stop token) and padding is exercised per family,
    including Llama-3's missing pad token and Gemma's pad id 0."""
    tokenizer = toy(family)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (bos, eos, pad)
    if family == "gemma3":
        assert tokenizer.pad_token_id == 0 and tokenizer.unk_token == "<unk>"


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_adds_bos_only_for_bos_families(family):
    """The AR prompt is encoded with special tokens: Llama/Gemma must get their BOS, Qwen none."""
    tokenizer = toy(family)
    ids = tokenizer.encode("Summary of the text")
    plain = tokenizer.encode("Summary of the text", add_special_tokens=False)
    if tokenizer.bos_token is None:
        assert ids == plain
    else:
        assert ids == [tokenizer.bos_token_id, *plain]


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_renders_bos_exactly_once(family):
    """The double-BOS failure mode: the template carries the BOS, tokenize=True must not add one."""
    tokenizer = toy(family)
    ids = chat_ids(tokenizer)
    if tokenizer.bos_token is None:
        assert tokenizer.convert_ids_to_tokens(ids[:1]) == ["<|im_start|>"]
    else:
        assert ids[0] == tokenizer.bos_token_id
        assert ids.count(tokenizer.bos_token_id) == 1


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        (
            "qwen2",
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
            "assistant.<|im_end|>\n<|im_start|>user\nHello there.<|im_end|>\n"
            "<|im_start|>assistant\n",
        ),
        (
            "llama",
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge "
            "Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user"
            "<|end_header_id|>\n\nHello there.<|eot_id|><|start_header_id|>assistant"
            "<|end_header_id|>\n\n",
        ),
        (
            "gemma3",
            "<bos><start_of_turn>user\nHello there.<end_of_turn>\n<start_of_turn>model\n",
        ),
    ],
)
def test_chat_template_renders_the_family_format(family, expected):
    """Prompt lengths, the generation prompt and the end-of-turn tokens the AV learns to emit
    follow the real templates (Qwen2.5's default system prompt, Llama-3.3's system header)."""
    rendered = toy(family).apply_chat_template(
        USER_CHAT, tokenize=False, add_generation_prompt=True
    )
    assert rendered == expected


def test_chat_template_uses_a_given_system_prompt():
    """Qwen's default system prompt is only a default; Gemma folds the system text into the
    first user turn."""
    messages = [{"role": "system", "content": "Be brief."}, *USER_CHAT]
    qwen = toy("qwen2").apply_chat_template(messages, tokenize=False)
    gemma = toy("gemma3").apply_chat_template(messages, tokenize=False)
    assert qwen.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and "Qwen" not in qwen
    assert gemma.startswith("<bos><start_of_turn>user\nBe brief.\n\nHello there.")


@pytest.mark.parametrize("family", FAMILIES)
def test_marker_code_points(family):
    """Each family's first single-token code point in U+3200-U+33FF is the real tokenizer's
    marker, and earlier code points split into several tokens so the search must skip them."""
    tokenizer = toy(family)
    first = FIRST_MARKER[family]
    assert len(tokenizer.encode(chr(first), add_special_tokens=False)) == 1
    earlier = [
        len(tokenizer.encode(chr(cp), add_special_tokens=False)) for cp in range(0x3200, first)
    ]
    assert earlier and min(earlier) >= 2


def test_first_markers_and_their_ids_differ_between_families():
    """A bug that uses one family's marker with another's tokenizer must not pass by accident."""
    ids = {
        family: toy(family).encode(chr(FIRST_MARKER[family]), add_special_tokens=False)[0]
        for family in FAMILIES
    }
    assert len(set(FIRST_MARKER.values())) == len(set(ids.values())) == len(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_concept_tags_give_the_marker_distinct_neighbours(family):
    """As in the real tokenizers, `<concept>` ends in a `>` token and `</concept>` starts with a
    `</` token, so the marker's neighbours are distinct and not merged with it."""
    tokenizer = toy(family)
    marker = chr(FIRST_MARKER[family])
    tokens = tokenizer.convert_ids_to_tokens(
        tokenizer.encode(f"\n\n<concept>{marker}</concept>\n\n", add_special_tokens=False)
    )
    pos = tokens.index(
        tokenizer.convert_ids_to_tokens(tokenizer.encode(marker, add_special_tokens=False))[0]
    )
    assert (tokens[pos - 1], tokens[pos + 1]) == (">", "</")


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_inverts_encode(family):
    """Byte-level BPE must round-trip any text, including the marker glyphs and accents."""
    tokenizer = toy(family)
    text = "Café ㈎ and ㎡: <explanation>\nx = 3.14\n</explanation>"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_tokenizer_reloads_with_the_same_behaviour(family, tmp_path):
    """The CPU quickstart and model exports write the toy to disk and load it with AutoTokenizer;
    ids, special tokens, BOS behaviour and the chat template must survive."""
    save_toy_tokenizer(family, tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    original = toy(family)
    text = "Summary of the following text: <text>㈎</text> <summary>"
    assert loaded.encode(text) == original.encode(text)
    assert chat_ids(loaded) == chat_ids(original)
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (
        original.bos_token,
        original.eos_token,
        original.pad_token,
    )
    assert len(loaded) == VOCAB_SIZE
