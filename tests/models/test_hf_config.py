"""Reading HF configs of every supported shape, and RoPE frequencies equal to transformers'."""

from __future__ import annotations

import pytest
import torch
import transformers

from nla_mcore.models.hf_config import (
    FULL,
    SLIDING,
    UnsupportedConfigError,
    parse_hf_config,
    rope_inv_freq,
)
from nla_mcore.models.registry import family_for
from nla_mcore.toy import toy_hf_config

HF_ROTARY = {
    "qwen2": transformers.models.qwen2.modeling_qwen2.Qwen2RotaryEmbedding,
    "llama": transformers.models.llama.modeling_llama.LlamaRotaryEmbedding,
}


def hf_config_object(raw: dict):
    return transformers.AutoConfig.for_model(**raw)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_rope_inv_freq_equals_transformers(family):
    """Llama-3 scaling and plain RoPE computed exactly as transformers does (fp32 equality)."""
    raw = toy_hf_config(family)
    ours = rope_inv_freq(parse_hf_config(raw).rope, raw["head_dim"])
    theirs = HF_ROTARY[family](hf_config_object(raw)).inv_freq
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_gemma3_two_rope_tables_equal_transformers():
    """Gemma-3: global layers use linear-scaled 1M base, sliding layers the 10k local base."""
    raw = toy_hf_config("gemma3")
    hf = parse_hf_config(raw)
    rotary = transformers.models.gemma3.modeling_gemma3.Gemma3RotaryEmbedding(hf_config_object(raw))
    torch.testing.assert_close(
        rope_inv_freq(hf.rope, 16), rotary.full_attention_inv_freq, rtol=0, atol=0
    )
    torch.testing.assert_close(
        rope_inv_freq(hf.local_rope, 16), rotary.sliding_attention_inv_freq, rtol=0, atol=0
    )


@pytest.mark.parametrize("family", ["qwen2", "llama", "gemma3"])
def test_transformers5_format_reads_the_same(family):
    """A config re-saved by transformers 5 (rope_parameters, layer_types) parses identically."""
    raw = toy_hf_config(family)
    resaved = hf_config_object(raw).to_dict()
    assert "rope_parameters" in resaved
    a, b = parse_hf_config(raw), parse_hf_config(resaved)
    assert (a.rope, a.local_rope, a.layer_types, a.sliding_window) == (
        b.rope,
        b.local_rope,
        b.layer_types,
        b.sliding_window,
    )


def test_gemma3_multimodal_checkpoint_reads_text_config():
    """Gemma-3-12B/27B-IT ship as Gemma3ForConditionalGeneration with the LM in text_config."""
    text = toy_hf_config("gemma3")
    del text["layer_types"]
    text["sliding_window_pattern"] = 2  # 4.x spelling: every 2nd layer is global
    hf = parse_hf_config({"model_type": "gemma3", "text_config": text, "tie_word_embeddings": True})
    assert hf.layer_types == (SLIDING, FULL, SLIDING, FULL)
    assert family_for(hf).name == "gemma3"


def test_qwen2_listed_window_layers_are_full_attention():
    """Qwen2 configs list layer_types/max_window_layers but never use sliding windows."""
    resaved = hf_config_object(toy_hf_config("qwen2")).to_dict()
    assert parse_hf_config(resaved).sliding_window is None


@pytest.mark.parametrize(
    "family, change, message",
    [
        ("gemma3", {"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
        ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
        ("llama", {"mlp_bias": True}, "mlp_bias"),
        (
            "qwen2",
            {"use_sliding_window": True, "layer_types": ["sliding_attention"] * 4},
            "use_sliding_window",
        ),
        ("llama", {"hidden_act": "gelu"}, "activation 'gelu'"),
    ],
)
def test_unsupported_configs_are_refused(family, change, message):
    with pytest.raises(UnsupportedConfigError, match=message):
        family_for(parse_hf_config(toy_hf_config(family, **change)))


def test_missing_key_is_named():
    raw = toy_hf_config("qwen2")
    del raw["hidden_size"]
    with pytest.raises(KeyError, match="'hidden_size'"):
        parse_hf_config(raw, source="some/config.json")


def test_unknown_model_type_lists_supported():
    with pytest.raises(KeyError, match="model_type 'mistral' is not supported"):
        family_for(parse_hf_config(toy_hf_config("llama", model_type="mistral")))
