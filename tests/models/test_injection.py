"""Injection batches: every malformed sample or vector is refused with the sample named."""

from __future__ import annotations

import pytest
import torch

from nla_mcore.models.injection import InjectionError, inject
from nla_mcore.prompts import normalize
from nla_mcore.sidecar import Tokens
from tests.converters.convert_worker import make_hf_model
from tests.models.nla_worker import bad_sample_rank
from tests.multirank import run_ranks

MARKER = Tokens(
    injection_char="\u320e",
    injection_token_id=9,
    injection_left_neighbor_id=4,
    injection_right_neighbor_id=5,
)
VOCAB = 16


def batch():
    tokens = torch.tensor([[1, 2, 4, 9, 5, 3, 0, 0], [1, 4, 9, 5, 7, 7, 3, 0]])
    return tokens, torch.randn(2, 6) * 3


def test_inject_rewrites_markers_and_scales_vectors():
    tokens, vectors = batch()
    out, table = inject(tokens, vectors, tokens=MARKER, vocab_size=VOCAB, injection_scale=150.0)
    assert out[0, 3] == VOCAB and out[1, 2] == VOCAB + 1
    assert torch.equal(out[out < VOCAB], tokens[out < VOCAB])
    torch.testing.assert_close(table.norm(dim=1), torch.full((2,), 150.0))
    torch.testing.assert_close(table, normalize(vectors, 150.0))


def edit(fn):
    tokens, vectors = batch()
    fn(tokens, vectors)
    return tokens, vectors


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t, v: t.__setitem__((1, 2), 7), "sample 1: the marker .* occurs 0 times"),
        (lambda t, v: t.__setitem__((0, 6), 9), "sample 0: the marker .* occurs 2 times"),
        (lambda t, v: t.__setitem__((1, 1), 8), r"sample 1: marker neighbours are ids \(8, 5\)"),
        (lambda t, v: t.__setitem__((0, 4), 8), r"sample 0: marker neighbours are ids \(4, 8\)"),
        (lambda t, v: v.__setitem__((1, 2), float("nan")), "sample 1: .* NaN or inf"),
        (lambda t, v: v.__setitem__(0, 0.0), "sample 0: .* all zeros"),
    ],
)
def test_bad_samples_are_named(change, message):
    tokens, vectors = edit(change)
    with pytest.raises(InjectionError, match=message):
        inject(tokens, vectors, tokens=MARKER, vocab_size=VOCAB, injection_scale=1.0)


def test_vector_count_and_width_are_checked():
    tokens, vectors = batch()
    with pytest.raises(InjectionError, match="2 samples but vectors of shape"):
        inject(tokens, vectors[:1], tokens=MARKER, vocab_size=VOCAB, injection_scale=1.0)
    with pytest.raises(InjectionError, match="width 6, the model's d is 8"):
        inject(tokens, vectors, tokens=MARKER, vocab_size=VOCAB, injection_scale=1.0, d_model=8)


def test_marker_at_the_edge_and_stray_virtual_ids_are_refused():
    tokens, vectors = batch()
    tokens[0] = torch.tensor([9, 5, 1, 1, 1, 1, 1, 1])
    with pytest.raises(InjectionError, match="sample 0: the marker is at the edge"):
        inject(tokens, vectors, tokens=MARKER, vocab_size=VOCAB, injection_scale=1.0)
    tokens, vectors = batch()
    tokens[0, 0] = VOCAB + 5  # an id that already looks virtual
    with pytest.raises(InjectionError, match="3 token ids >= vocab_size"):
        inject(tokens, vectors, tokens=MARKER, vocab_size=VOCAB, injection_scale=1.0)


def test_padding_after_length_is_ignored():
    """A marker id inside the right padding is not a second marker when lengths are given."""
    tokens, vectors = batch()
    tokens[1, 7] = 9
    inject(
        tokens,
        vectors,
        tokens=MARKER,
        vocab_size=VOCAB,
        injection_scale=1.0,
        lengths_B=torch.tensor([6, 7]),
    )


@pytest.mark.slow
def test_bad_sample_fails_on_both_pipeline_stages_within_seconds(tmp_path):
    """PP2: a bad sample must not leave the other stage waiting in a p2p receive."""
    hf_dir = make_hf_model("llama", tmp_path / "hf")
    results = run_ranks(bad_sample_rank, 2, str(hf_dir), dict(pipeline_parallel=2), timeout=120)
    for rank, result in enumerate(results):
        assert result["error"] and "sample 1: the marker" in result["error"], (rank, result)
        assert result["seconds"] < 10, (rank, result)
