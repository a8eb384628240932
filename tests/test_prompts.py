"""Prompts, markers, the explanation format and vector normalisation: the pieces every stage
shares, so a mismatch between them is a silent training bug."""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path

import pytest
import torch
import yaml

from nla_mcore import prompts
from nla_mcore.toy_tokenizers import FAMILIES, build_toy_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "sidecars"


@cache
def toy(family: str):
    return build_toy_tokenizer(family)


class StubTokenizer:
    """Encodes every character to ``ids_for(char)``; for error paths the toys cannot reach."""

    name_or_path = "stub/tokenizer"
    unk_token_id = 0

    def __init__(self, ids_for, chat_result=None):
        self.ids_for, self.chat_result = ids_for, chat_result

    def encode(self, text, add_special_tokens=False):
        return [i for char in text for i in self.ids_for(char)]

    def apply_chat_template(self, messages, **kwargs):
        return self.chat_result


# --- marker ------------------------------------------------------------------------------------


def test_markers_differ_by_family_and_are_single_tokens():
    """Each family gets its own marker (as the real Qwen/Llama/Gemma do) and it is one token."""
    markers = {family: prompts.select_marker(toy(family)) for family in FAMILIES}
    assert {f: hex(ord(m.char)) for f, m in markers.items()} == {
        "qwen2": "0x320e",
        "llama": "0x33a1",
        "gemma3": "0x321c",
    }
    for family, marker in markers.items():
        assert toy(family).encode(marker.char, add_special_tokens=False) == [marker.token_id]


def test_select_marker_skips_unk():
    """A code point that encodes to the UNK id is one token but not a usable marker."""
    stub = StubTokenizer(
        lambda char: [0] if char == "\u3200" else [7] if char == "\u3201" else [5, 6]
    )
    assert prompts.select_marker(stub) == prompts.Marker(char="\u3201", token_id=7)


def test_select_marker_error_names_the_tokenizer():
    """A tokenizer without any single-token code point in the range must be named in the error."""
    with pytest.raises(prompts.PromptError, match="stub/tokenizer"):
        prompts.select_marker(StubTokenizer(lambda char: [5, 6]))


# --- AV prompt ---------------------------------------------------------------------------------


def test_av_template_is_the_released_wording():
    """Checkpoints were trained on this exact text; compare with the released sidecar's copy."""
    raw = yaml.safe_load((FIXTURES / "qwen2.5-7b-L20-av-v1" / "nla_meta.yaml").read_text())
    assert prompts.AV_PROMPT_TEMPLATE == raw["prompt_templates"]["actor"]
    assert prompts.AR_PROMPT_TEMPLATE == raw["prompt_templates"]["critic"]


@pytest.mark.parametrize("family", FAMILIES)
def test_canonical_prompt_holds_the_marker_once_between_its_neighbours(family):
    """Injection finds the marker by id and checks the recorded `>` / `</` neighbours."""
    tokenizer = toy(family)
    marker = prompts.select_marker(tokenizer)
    av_prompt = prompts.build_av_prompt(tokenizer, marker)
    assert av_prompt.ids.count(marker.token_id) == 1
    assert av_prompt.ids[av_prompt.marker_pos] == marker.token_id
    assert tokenizer.convert_ids_to_tokens([av_prompt.left_id, av_prompt.right_id]) == [">", "</"]
    assert av_prompt.ids[av_prompt.marker_pos - 1] == av_prompt.left_id
    assert av_prompt.ids[av_prompt.marker_pos + 1] == av_prompt.right_id


@pytest.mark.parametrize("family", FAMILIES)
def test_av_prompt_has_bos_exactly_once_where_the_family_has_one(family):
    """Double BOS shifts the injection by one; Qwen must have none."""
    tokenizer = toy(family)
    av_prompt = prompts.build_av_prompt(tokenizer, prompts.select_marker(tokenizer))
    if tokenizer.bos_token_id is None:
        assert tokenizer.convert_ids_to_tokens(list(av_prompt.ids[:1])) == ["<|im_start|>"]
    else:
        assert av_prompt.ids[0] == tokenizer.bos_token_id
        assert av_prompt.ids.count(tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_av_prompt_ends_with_the_generation_prompt(family):
    """RL rollouts start generating right after the prompt, so it ends with the assistant header."""
    tokenizer = toy(family)
    av_prompt = prompts.build_av_prompt(tokenizer, prompts.select_marker(tokenizer))
    tail = tokenizer.decode(list(av_prompt.ids[-6:]))
    assert tail.endswith(
        {
            "qwen2": "<|im_start|>assistant\n",
            "llama": "assistant<|end_header_id|>\n\n",
            "gemma3": "<start_of_turn>model\n",
        }[family]
    )


def test_marker_twice_in_the_prompt_is_refused():
    """A template that also contains the glyph would make the injection site ambiguous."""
    tokenizer = toy("qwen2")
    marker = prompts.select_marker(tokenizer)
    template = prompts.AV_PROMPT_TEMPLATE.replace("Here is", f"Here {marker.char} is")
    with pytest.raises(prompts.PromptError, match="2 times"):
        prompts.build_av_prompt(tokenizer, marker, template)


def test_template_slot_must_appear_once():
    """A template without its slot (or with two) cannot be filled unambiguously."""
    with pytest.raises(prompts.PromptError, match="found 0"):
        prompts.av_messages("x", "no slot here")
    with pytest.raises(prompts.PromptError, match="found 2"):
        prompts.format_ar_prompt("x", "{explanation} and {explanation}")


def test_av_messages_accept_the_placeholder():
    """Datagen writes the literal <INJECT> slot into av_sft prompts; loaders swap the marker in."""
    (message,) = prompts.av_messages(prompts.INJECT_PLACEHOLDER)
    assert message["role"] == "user"
    assert "<concept><INJECT></concept>" in message["content"]


@pytest.mark.parametrize(
    "rendered",
    [[1, 2, 3], [[1, 2, 3]], {"input_ids": [1, 2, 3]}, {"input_ids": [[1, 2, 3]]}],
)
def test_chat_prompt_ids_accepts_every_return_shape(rendered):
    """transformers versions return a list, a batch of one, or a BatchEncoding from
    apply_chat_template(tokenize=True); iterating a dict would silently scan its keys."""
    stub = StubTokenizer(lambda char: [1], chat_result=rendered)
    assert prompts.chat_prompt_ids(stub, [{"role": "user", "content": "x"}]) == [1, 2, 3]


# --- AR prompt ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_ar_prompt_has_bos_exactly_once_where_the_family_has_one(family):
    """Without its BOS Gemma's AR FVE fell from 0.77 to 0.31; Qwen has none to add."""
    tokenizer = toy(family)
    ids = prompts.ar_prompt_ids(tokenizer, "A recipe; the last token opens a list.")
    if tokenizer.bos_token_id is None:
        assert ids == tokenizer.encode(
            prompts.format_ar_prompt("A recipe; the last token opens a list."),
            add_special_tokens=False,
        )
    else:
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "explanation",
    ["plain words", "ends with a period.", "digits 2024", "quote's end'", "CJK 漢字", "㈎", "a\nb"],
)
def test_ar_suffix_ids_are_the_tail_of_every_ar_prompt(family, explanation):
    """Datagen records critic_suffix_ids and training checks prompts end with them, whatever the
    explanation's last characters are."""
    tokenizer = toy(family)
    suffix = prompts.ar_suffix_ids(tokenizer)
    assert prompts.ar_prompt_ids(tokenizer, explanation)[-len(suffix) :] == suffix
    assert tokenizer.decode(suffix) == "text> <summary>"


def test_ar_template_must_end_with_a_suffix():
    """Without text after the explanation there is no stable suffix to record."""
    with pytest.raises(prompts.PromptError, match="no stable suffix"):
        prompts.ar_suffix_ids(toy("qwen2"), "Summary: {explanation}")


def test_ar_prompt_text():
    """The AR input wording is part of the contract with released ARs."""
    assert (
        prompts.format_ar_prompt("x y")
        == "Summary of the following text: <text>x y</text> <summary>"
    )


# --- explanation format ------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["one line", "two\nlines", "  padded  ", "has <tags> inside"])
def test_explanation_round_trip(text):
    """The AV-SFT target and the RL parser must agree; parsing strips, like the original."""
    target = prompts.format_av_target(text)
    assert target == f"<explanation>\n{text}\n</explanation>"
    assert prompts.parse_explanation(target) == text.strip()


@pytest.mark.parametrize(
    "response",
    [
        "no tags at all",
        "<explanation>\ntruncated before the close tag",
        "</explanation> closed before <explanation> opened",
        "<explanation>\n   \n</explanation>",
        "",
    ],
)
def test_unparseable_explanations_give_none(response):
    """Unparseable, truncated and empty responses get the failure reward, so parse returns None."""
    assert prompts.parse_explanation(response) is None


def test_parser_takes_the_first_explanation_across_lines():
    """DOTALL: explanations span lines; trailing chatter or a second block is ignored."""
    response = (
        "Sure.\n<explanation>\nfirst\nsecond\n</explanation> and <explanation>x</explanation>"
    )
    assert prompts.parse_explanation(response) == "first\nsecond"


# --- vectors -----------------------------------------------------------------------------------


def test_normalize_rescales_rows_in_fp32():
    """Every row gets norm `scale` (fp32: tolerance is fp32 rounding), direction unchanged."""
    vec_ND = torch.randn(4, 64, dtype=torch.float32) * 7
    out_ND = prompts.normalize(vec_ND, 150.0)
    assert torch.allclose(out_ND.norm(dim=-1), torch.full((4,), 150.0), rtol=1e-6)
    assert torch.allclose(torch.cosine_similarity(out_ND, vec_ND, dim=-1), torch.ones(4), atol=1e-6)


def test_normalize_keeps_zero_rows_zero():
    """An all-zero vector (padding rows, dead positions) must not turn into NaN."""
    vec_ND = torch.zeros(3, 16, dtype=torch.bfloat16)
    vec_ND[1] = 1.0
    out_ND = prompts.normalize(vec_ND, math.sqrt(16))
    assert torch.isfinite(out_ND.float()).all()
    assert out_ND[0].abs().sum() == 0 and out_ND[2].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_normalize_handles_gemma_scale_norms_in_low_precision(dtype):
    """Gemma residual norms are ~74k: the sum of squares overflows fp16 unless the norm is taken
    in fp32. Tolerance 1 % covers the final rounding to 8 (bf16) or 11 (fp16) mantissa bits."""
    d = 3840
    vec_ND = (torch.randn(8, d) * (74_000 / math.sqrt(d))).to(dtype)
    out_ND = prompts.normalize(vec_ND, 80_000.0)
    assert out_ND.dtype == dtype
    norms = out_ND.float().norm(dim=-1)
    assert torch.isfinite(norms).all()
    assert torch.allclose(norms, torch.full((8,), 80_000.0), rtol=1e-2)


def test_normalize_none_is_identity():
    """scale=None means raw vectors: the same tensor comes back."""
    vec_ND = torch.randn(2, 8)
    assert prompts.normalize(vec_ND, None) is vec_ND


def test_normalize_rejects_non_positive_scale():
    """A zero or negative scale is a config error, not a vector to produce."""
    with pytest.raises(ValueError, match="positive"):
        prompts.normalize(torch.ones(1, 4), 0.0)


def test_sqrt_d_scale_makes_mse_twice_one_minus_cos():
    """With mse_scale = √d, mean_d (p̂ − ĝ)² = 2(1 − cos): the identity the reward relies on."""
    d = 256
    p_ND, g_ND = torch.randn(5, d, dtype=torch.float64), torch.randn(5, d, dtype=torch.float64)
    scale = prompts.default_mse_scale(d)
    mse_N = (prompts.normalize(p_ND, scale) - prompts.normalize(g_ND, scale)).pow(2).mean(dim=-1)
    cos_N = torch.cosine_similarity(p_ND, g_ND, dim=-1)
    assert torch.allclose(mse_N, 2 * (1 - cos_N))


def test_defaults_match_the_released_checkpoints():
    """K = 2L // 3 gives the released Gemma and Llama layers (Qwen's 20 was chosen by hand)."""
    assert prompts.default_mse_scale(3584) == pytest.approx(59.8665, abs=1e-4)
    assert [prompts.default_extraction_layer(n) for n in (48, 62, 80, 28)] == [32, 41, 53, 18]
    with pytest.raises(ValueError):
        prompts.default_extraction_layer(0)
