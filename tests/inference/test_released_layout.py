"""The released layout (built by `released_layout.py` from NLA.md, not by our exporter) loads
and explains, in sidecar schema v1 and v2, and every failure mode of NLA.md that the files can
show is refused (or warned about) with a message that names it.

References are plain transformers on the *full* base model: the AV's greedy tokens recomputed
from scratch with the vector spliced into `inputs_embeds`, and the AR's prediction as block K's
output (a hook, no final norm) through the head.  fp32 on the CPU, so the client (which uses
`generate` with a KV cache) and the critic (a truncated `AutoModel`) must agree to ~1e-6.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nla_mcore.inference.client import NLAClient
from nla_mcore.inference.critic import NLACritic
from nla_mcore.inference.model_dirs import NLAModelError, check_bos, check_embedding_scale
from nla_mcore.prompts import ar_prompt_ids, normalize
from nla_mcore.sidecar import SidecarDriftError, SidecarError
from tests.inference.released_layout import (
    INJECTION_SCALE,
    K,
    edit_sidecar,
    released_pair,
)
from tests.models.nla_worker import hf_ar_outputs

LAYOUTS = [("qwen2", "v1"), ("gemma3", "v2"), ("llama", "v1")]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    cache = {}

    def get(family, schema, **kwargs):
        key = (family, schema, tuple(sorted(kwargs.items())))
        if key not in cache:
            root = tmp_path_factory.mktemp(f"released_{family}_{schema}")
            cache[key] = released_pair(root, family, schema, **kwargs)
        return cache[key]

    return get


def reference_greedy(base, prompt_ids, marker_pos, vector_D, steps):
    """(greedy ids, the first step's logits [V]); transformers, no cache: each step recomputes
    the whole sequence."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ids, first = list(prompt_ids), None
    for _ in range(steps):
        with torch.no_grad():
            embeds = model.get_input_embeddings()(torch.tensor([ids])).clone()
            embeds[0, marker_pos] = normalize(vector_D[None].float(), INJECTION_SCALE)[0]
            logits_V = model(inputs_embeds=embeds).logits[0, -1]
        first = logits_V if first is None else first
        ids.append(int(logits_V.argmax()))
    return ids[len(prompt_ids) :], first


@pytest.mark.parametrize("family,schema", LAYOUTS)
def test_released_av_explains_like_transformers(released, family, schema):
    dirs = released(family, schema)
    client = NLAClient(dirs["av"], device="cpu")
    assert client.injection_scale == INJECTION_SCALE
    vectors = torch.randn(2, 64, generator=torch.Generator().manual_seed(0)) * 7
    got = client.explain(vectors.numpy(), max_new_tokens=NEW_TOKENS)
    with torch.no_grad():
        logits_BV = client.model(inputs_embeds=client.prompt_embeddings(vectors)).logits[:, -1]
    for vector, explanation, logits_V in zip(vectors, got, logits_BV, strict=True):
        want, want_logits_V = reference_greedy(
            dirs["base"], client.prompt_ids, client.marker_pos, vector, len(explanation.token_ids)
        )
        assert list(explanation.token_ids) == want
        torch.testing.assert_close(logits_V, want_logits_V, atol=1e-5, rtol=1e-5)
        assert explanation.text is None or isinstance(explanation.text, str)


@pytest.mark.parametrize("family,schema", LAYOUTS)
def test_released_ar_reconstructs_block_k_through_the_head(released, family, schema):
    dirs = released(family, schema)
    critic = NLACritic(dirs["ar"], device="cpu")
    assert critic.extraction_layer == K
    texts = ["The cat sat on the mat.", "A list of three items, in a formal tone."]
    rows = [ar_prompt_ids(critic.dir.tokenizer, t) for t in texts]
    length = max(map(len, rows))
    pad = [r + [0] * (length - len(r)) for r in rows]  # the reference is causal: pads are after
    head = load_file(str(dirs["ar"] / "value_head.safetensors"))["weight"]
    want = hf_ar_outputs(
        dirs["base"], torch.tensor(pad), torch.tensor([len(r) - 1 for r in rows]), head=head
    )
    got = critic.reconstruct(texts)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=1e-5)
    assert critic.mse_scale == pytest.approx(64**0.5)


def test_gemma_embedding_without_sqrt_d_is_refused(released):
    """A Gemma AV whose loaded embedding lost the sqrt(d) multiplier (a class that does not
    scale) would see its prompt at 1/8 of the training scale here."""
    client = NLAClient(released("gemma3", "v2")["av"], device="cpu")
    plain = torch.nn.Embedding.from_pretrained(client.model.get_input_embeddings().weight)
    client.model.set_input_embeddings(plain)
    with pytest.raises(NLAModelError, match=r"missing sqrt\(d\)"):
        check_embedding_scale(client.model, client.dir, client.prompt_ids[0])


def test_marker_absent_from_the_template_is_refused(released, tmp_path):
    av = _copy(released("qwen2", "v2")["av"], tmp_path)
    edit_sidecar(av, lambda d: d["prompt_templates"].update(av="Explain the vector."))
    with pytest.raises(SidecarError, match="injection_char"):
        NLAClient(av, device="cpu")


def test_marker_split_into_several_tokens_is_refused(released, tmp_path):
    av = _copy(released("qwen2", "v2")["av"], tmp_path)
    edit_sidecar(av, lambda d: d["tokens"].update(injection_char="🧪"))
    with pytest.raises(SidecarDriftError, match="injection_token_id drifted.*encodes it as"):
        NLAClient(av, device="cpu")


def test_template_drift_around_the_marker_is_refused(released, tmp_path):
    av = _copy(released("llama", "v1")["av"], tmp_path)
    edit_sidecar(
        av,
        lambda d: d["prompt_templates"].update(
            actor=d["prompt_templates"]["actor"].replace(
                "<concept>{injection_char}", "<concept> {injection_char}"
            )
        ),
    )
    with pytest.raises(SidecarDriftError, match="injection_left_neighbor_id drifted"):
        NLAClient(av, device="cpu")


def test_double_bos_in_the_ar_prompt_is_refused(released, tmp_path):
    ar = _copy(released("gemma3", "v2")["ar"], tmp_path)
    bos = NLACritic(ar, device="cpu").dir.tokenizer.bos_token
    edit_sidecar(ar, lambda d: d["prompt_templates"].update(ar=bos + d["prompt_templates"]["ar"]))
    with pytest.raises(NLAModelError, match="2 BOS tokens"):
        NLACritic(ar, device="cpu")


def test_ar_prompt_without_bos_is_refused():
    """Llama/Gemma AR prompts start with BOS (Gemma's FVE fell from 0.77 to 0.31 without)."""

    class Tok:
        bos_token_id = 2

    with pytest.raises(NLAModelError, match="does not start with the BOS"):
        check_bos([5, 6, 7], Tok(), "AR prompt", required=True)
    check_bos([2, 5, 6], Tok(), "AR prompt", required=True)


def test_ar_with_k_layers_instead_of_k_plus_one_is_refused(released):
    ar = released("qwen2", "v2", ar_layers=K)["ar"]
    with pytest.raises(NLAModelError, match=r"has 2 decoder layers = K; it must have K\+1 = 3"):
        NLACritic(ar, device="cpu")


def test_v1_depth_disagreeing_with_config_is_refused(released, tmp_path):
    ar = _copy(released("qwen2", "v1")["ar"], tmp_path)
    edit_sidecar(ar, lambda d: d["critic"].update(num_hidden_layers=5))  # K = 4
    with pytest.raises(NLAModelError, match="has 3 decoder layers, it must have K\\+1 = 5"):
        NLACritic(ar, device="cpu")


def test_random_value_head_is_warned_about(released, caplog):
    ar = released("llama", "v2", head="random")["ar"]
    with caplog.at_level(logging.WARNING, logger="nla_mcore.inference.model_dirs"):
        NLACritic(ar, device="cpu")
    assert "randomly initialised" in caplog.text


def test_missing_value_head_and_wrong_roles_are_refused(released, tmp_path):
    dirs = released("qwen2", "v1")
    with pytest.raises(NLAModelError, match="is an AV .* but an AR .* was expected"):
        NLACritic(dirs["av"], device="cpu")
    with pytest.raises(NLAModelError, match="is an AR .* but an AV .* was expected"):
        NLAClient(dirs["ar"], device="cpu")
    ar = _copy(dirs["ar"], tmp_path)
    (ar / "value_head.safetensors").unlink()
    with pytest.raises(NLAModelError, match="no value_head.safetensors"):
        NLACritic(ar, device="cpu")
    (ar / "nla_meta.yaml").unlink()
    with pytest.raises(NLAModelError, match="no nla_meta.yaml"):
        NLACritic(ar, device="cpu")


def _copy(directory, tmp_path):
    import shutil

    out = tmp_path / directory.name
    shutil.copytree(directory, out)
    return out
