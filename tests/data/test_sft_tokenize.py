"""SFT tokenisation and micro-batches per family: what the loss sees, exactly (NLA.md "AV",
"AR", and its failure modes: double BOS, template drift, end of turn not learnt)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from nla_mcore.data.sft_batches import ar_microbatch, av_microbatch
from nla_mcore.data.sft_files import DataError, read_sft_file
from nla_mcore.data.sft_tokenize import tokenize_ar, tokenize_av
from nla_mcore.toy_tokenizers import build_toy_tokenizer
from tests.train.sft_toys import sft_files

END_OF_TURN = {"qwen2": "<|im_end|>", "llama": "<|eot_id|>", "gemma3": "<end_of_turn>"}
VOCAB = 2048  # any model vocabulary >= the toy tokenizer's 1536 ids
FAMILIES = tuple(END_OF_TURN)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = {}
    for family in FAMILIES:
        tokenizer = build_toy_tokenizer(family)
        paths = sft_files(tmp_path_factory.mktemp(family), tokenizer, n=12)
        out[family] = (tokenizer, paths)
    return out


def av_set(files, family, max_length=512, skip=False):
    tokenizer, paths = files[family]
    rows = read_sft_file(paths["av_sft"], "av_sft")
    data = tokenize_av(
        rows, tokenizer, tokens=rows.sidecar.tokens, max_length=max_length, skip=skip
    )
    return tokenizer, rows, data


@pytest.mark.parametrize("family", FAMILIES)
def test_av_supervises_exactly_the_response_and_the_end_of_turn(files, family):
    """The loss covers the response tokens and the template's end-of-turn token, nothing of
    the prompt, not the newline some templates add after the end of turn, not the padding."""
    tokenizer, rows, data = av_set(files, family)
    samples = np.arange(4)
    length = int(data.lengths_N[samples].max()) + 5  # some right padding
    batch = av_microbatch(
        data,
        samples,
        length,
        pad_id=0,
        tokens=rows.sidecar.tokens,
        vocab_size=VOCAB,
        injection_scale=10.0,
    )
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN[family])
    for b, i in enumerate(samples):
        supervised = batch["labels"][b][batch["loss_mask"][b] > 0].tolist()
        expected = tokenizer.encode(rows.responses[i], add_special_tokens=False) + [eot]
        assert supervised == expected
        first = int(torch.nonzero(batch["loss_mask"][b])[0])
        assert first == data.prompt_lengths_N[i] - 1  # predicts the first response token


@pytest.mark.parametrize("family", FAMILIES)
def test_av_prompt_has_one_bos_and_one_virtual_token_at_the_marker(files, family):
    """The chat template renders the BOS itself (no second one from encode), and injection
    rewrites exactly the marker into the virtual id of its sample."""
    tokenizer, rows, data = av_set(files, family)
    ids = data.sample_ids(0).tolist()
    if tokenizer.bos_token_id is not None:
        assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    batch = av_microbatch(
        data,
        np.arange(3),
        int(data.lengths_N[:3].max()),
        pad_id=0,
        tokens=rows.sidecar.tokens,
        vocab_size=VOCAB,
        injection_scale=10.0,
    )
    virtual = (batch["tokens"] >= VOCAB).nonzero().tolist()
    marker = ids.index(rows.sidecar.tokens.injection_token_id)
    assert virtual == [[b, marker] for b in range(3)]
    assert batch["tokens"][1, marker] == VOCAB + 1
    assert torch.allclose(batch["injection"].norm(dim=1), torch.full((3,), 10.0))


@pytest.mark.parametrize("family", FAMILIES)
def test_ar_prompt_has_the_bos_and_is_read_at_its_last_token(files, family):
    tokenizer, paths = files[family]
    rows = read_sft_file(paths["ar_sft"], "ar_sft")
    suffix = rows.sidecar.tokens.critic_suffix_ids
    data = tokenize_ar(rows, tokenizer, suffix_ids=suffix, max_length=512, skip=False)
    ids = data.sample_ids(0).tolist()
    assert ids[-len(suffix) :] == suffix
    if tokenizer.bos_token_id is not None:
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    batch = ar_microbatch(data, np.arange(4), 128, pad_id=0)
    assert batch["readout_index"].tolist() == (data.lengths_N[:4] - 1).tolist()
    assert np.allclose(batch["target"].numpy(), rows.vectors_ND[:4])


def test_a_sample_longer_than_the_context_is_named_or_skipped(files):
    _, _, data = av_set(files, "llama")
    limit = int(data.lengths_N.max()) - 1
    too_long = np.flatnonzero(data.lengths_N > limit)
    with pytest.raises(DataError, match=rf"row {too_long[0]} .*data\.max_length={limit}") as err:
        av_set(files, "llama", max_length=limit)
    assert f"({len(too_long)} rows like this)" in str(err.value)
    _, _, kept = av_set(files, "llama", max_length=limit, skip=True)
    assert kept.skipped["too_long"] == len(too_long)
    assert len(kept) == len(data) - len(too_long)


def test_drifted_marker_neighbours_are_refused(files):
    """A sidecar whose neighbour ids do not match the live prompt (template or tokenizer drift)
    is refused before training, naming the row."""
    tokenizer, paths = files["qwen2"]
    rows = read_sft_file(paths["av_sft"], "av_sft")
    rows.sidecar.tokens = dataclasses.replace(rows.sidecar.tokens, injection_left_neighbor_id=7)
    with pytest.raises(DataError, match="row 0 .*neighbours"):
        tokenize_av(rows, tokenizer, tokens=rows.sidecar.tokens, max_length=512, skip=False)
