"""Extract stage: the vectors are block K's output at the chosen positions, sharding is
invisible in the union of the shards, and bad inputs are counted or named."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from datagen_toys import documents, extract_config, make_toy, one_torch_thread, rows_of, write_jsonl

from nla_mcore.datagen.extract import ExtractError, collect_extract, run_extract
from nla_mcore.datagen.parquet_io import activation_schema
from nla_mcore.sidecar import check_marker, read_dataset_sidecar


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models, shared 2-core machine: one torch thread is faster (see one_torch_thread)."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return make_toy("gemma3", tmp_path_factory.mktemp("gemma"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_toy("llama", tmp_path_factory.mktemp("llama"))


class RecordingProvider:
    """Wraps a provider; records every call (and can corrupt outputs for error tests)."""

    def __init__(self, inner, corrupt=None):
        self.inner, self.corrupt, self.calls = inner, corrupt, []
        self.d_model, self.layer = inner.d_model, inner.layer

    def activations(self, batch_token_ids, batch_positions):
        self.calls.append((batch_token_ids, batch_positions))
        out = self.inner.activations(batch_token_ids, batch_positions)
        return self.corrupt(out) if self.corrupt else out


def test_vectors_are_hidden_states_k_plus_1_at_the_positions(gemma, tmp_path):
    """The stored vector of each row must equal HF `hidden_states[K+1]` of an unbatched, unpadded
    forward of the document at that position (Gemma-3: sliding-window layers, padding and
    length-sorted batching must not leak into the vectors). 1e-5 absolute: float32 GEMMs of
    different shapes reassociate sums; the vectors have norm ~10."""
    corpus = write_jsonl(tmp_path / "c.jsonl", documents(12, seed=1))
    summary = run_extract(
        extract_config([corpus]), gemma.provider(2), gemma.tokenizer, out_dir=tmp_path / "x"
    )
    rows = rows_of(summary.shards)
    assert len(rows) == summary.stats.rows > 0
    texts = {f"{corpus}:{i + 1}": t for i, t in enumerate(documents(12, seed=1))}
    for doc_id in {doc_id for doc_id, _ in rows}:
        ids = gemma.tokenizer(texts[doc_id], add_special_tokens=True)["input_ids"][:160]
        with torch.no_grad():
            hidden = gemma.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        for (row_doc, position), row in rows.items():
            if row_doc == doc_id:
                expected = hidden.hidden_states[3][0, position].numpy()
                np.testing.assert_allclose(row["activation_vector"], expected, atol=1e-5, rtol=0)
                assert row["n_raw_tokens"] == position + 1 and row["activation_layer"] == 2


def test_last_block_is_read_before_the_final_norm(gemma):
    """For K = L-1 Hugging Face's last hidden state has the final norm applied; NLA's vector is
    the block's own output, so the provider must return the pre-norm tensor."""
    ids = gemma.tokenizer(documents(1)[0] * 3)["input_ids"][:80]
    (vec_PD,) = gemma.provider(3).activations([ids], [[60, 79]])
    with torch.no_grad():
        out = gemma.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    final_norm = gemma.model.model.norm
    assert not np.allclose(vec_PD, out.hidden_states[4][0, [60, 79]].numpy(), atol=1e-3)
    np.testing.assert_allclose(
        final_norm(torch.from_numpy(vec_PD)).detach().numpy(),
        out.hidden_states[4][0, [60, 79]].numpy(),
        atol=1e-5,
    )


def test_dp_sharding_does_not_change_the_rows(llama, tmp_path):
    """Three DP ranks must produce, together, exactly the rows of one rank: the same documents,
    positions and texts (positions are seeded by the doc id), and the same vectors up to float
    reassociation (other batch shapes)."""
    corpus = write_jsonl(tmp_path / "c.jsonl", documents(40, seed=2))
    cfg = extract_config([corpus])
    single = run_extract(cfg, llama.provider(), llama.tokenizer, out_dir=tmp_path / "dp1")
    for rank in range(3):
        run_extract(
            cfg,
            llama.provider(),
            llama.tokenizer,
            out_dir=tmp_path / "dp3",
            dp_rank=rank,
            dp_size=3,
        )
    sharded = collect_extract(tmp_path / "dp3")
    one, three = rows_of(single.shards), rows_of(sharded.shards)
    assert sorted(one) == sorted(three)
    for key, row in one.items():
        other = three[key]
        assert (row["n_raw_tokens"], row["detokenized_text_truncated"]) == (
            other["n_raw_tokens"],
            other["detokenized_text_truncated"],
        )
        np.testing.assert_allclose(row["activation_vector"], other["activation_vector"], atol=1e-5)
    assert sharded.stats.to_json() == single.stats.to_json()


def test_shards_schema_sidecar_and_manifest(llama, tmp_path):
    """Each shard has the activation schema, <= rows_per_shard rows, several row groups, a sidecar
    that validates (marker checkable against the tokenizer), and the manifest lists them all."""
    corpus = write_jsonl(tmp_path / "c.jsonl", documents(20, seed=3))
    cfg = extract_config([corpus], row_group_rows=8)
    summary = run_extract(cfg, llama.provider(), llama.tokenizer, out_dir=tmp_path / "x")
    assert len(summary.shards) == 3 and summary.complete
    for shard in summary.shards:
        parquet = pq.ParquetFile(shard)
        assert parquet.schema_arrow.remove_metadata().equals(activation_schema(64))
        assert parquet.metadata.num_rows <= 32
        assert parquet.metadata.num_row_groups == -(-parquet.metadata.num_rows // 8)
        sidecar = read_dataset_sidecar(shard)
        assert (sidecar.stage, sidecar.row_count) == ("base", parquet.metadata.num_rows)
        assert (sidecar.extraction.layer_index, sidecar.extraction.d_model) == (2, 64)
        assert sidecar.extraction.norm == "none" and sidecar.extraction.positions_per_doc == 4
        check_marker(sidecar, llama.tokenizer)
    manifest = json.loads((tmp_path / "x" / "extract-manifest-dp000.json").read_text())
    assert [s["index"] for s in manifest["shards"]] == [0, 1, 2] and manifest["complete"]


def test_model_parallel_ranks_make_the_same_calls_and_only_the_writer_writes(llama, tmp_path):
    """Every rank of a model-parallel group must call the provider with the same batches in the
    same order (else the group's collectives hang); a non-writer leaves no file behind.
    `agree_on_resume` is how the group settles where to resume."""
    corpus = write_jsonl(tmp_path / "c.jsonl", documents(20, seed=4))
    cfg = extract_config([corpus])
    writer, other = RecordingProvider(llama.provider()), RecordingProvider(llama.provider())
    asked = []
    run_extract(cfg, writer, llama.tokenizer, out_dir=tmp_path / "w")
    run_extract(
        cfg,
        other,
        llama.tokenizer,
        out_dir=tmp_path / "n",
        is_writer=False,
        agree_on_resume=lambda n: asked.append(n) or n,
    )
    assert writer.calls == other.calls and len(writer.calls) > 3
    assert all(len(ids) <= 4 for ids, _ in writer.calls)
    for ids, _ in writer.calls:  # length-sorted: longest first, padded total within budget
        lengths = [len(x) for x in ids]
        assert lengths == sorted(lengths, reverse=True) and len(ids) * lengths[0] <= 640
    assert asked == [0] and not (tmp_path / "n").exists()


def test_bad_documents_are_counted_not_fatal(llama, tmp_path):
    """Empty documents, documents shorter than 50 tokens, non-UTF-8 bytes and broken JSON lines
    are skipped and counted by reason in the summary and the manifest; the rest is extracted."""
    good = documents(3, seed=5, max_paragraphs=3)
    lines = [json.dumps({"text": t}).encode() for t in good]
    lines += [b'{"text": ""}', b'{"text": "too short"}', b'{"text": "caf\xe9"}', b"{oops"]
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(b"\n".join(lines) + b"\n")
    summary = run_extract(
        extract_config([corpus]), llama.provider(), llama.tokenizer, out_dir=tmp_path / "x"
    )
    assert dict(summary.stats.skipped_docs) == {
        "empty": 1,
        "too_short": 1,
        "invalid_utf8": 1,
        "bad_json": 1,
    }
    assert summary.stats.docs_read == 7 and summary.stats.docs_used == 3
    assert summary.stats.rows == 12


def test_missing_corpus_file_is_named(llama, tmp_path):
    """A corpus file that does not exist must fail before any work, naming the file."""
    cfg = extract_config([tmp_path / "missing.jsonl"])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        run_extract(cfg, llama.provider(), llama.tokenizer, out_dir=tmp_path / "x")


def test_nonfinite_vectors_error_naming_the_row_or_are_dropped(llama, tmp_path):
    """A NaN from the model (e.g. fp16 overflow) must stop the run naming the document and
    position, or, with on_nonfinite=skip, drop exactly those rows and count them."""
    corpus = write_jsonl(tmp_path / "c.jsonl", documents(4, seed=6))

    def poison(out):
        out[0][1, 3] = np.nan
        return out

    provider = RecordingProvider(llama.provider(), corrupt=poison)
    with pytest.raises(ExtractError, match=r"NaN/inf vector for document '.*c.jsonl:\d' position"):
        run_extract(extract_config([corpus]), provider, llama.tokenizer, out_dir=tmp_path / "a")
    provider = RecordingProvider(llama.provider(), corrupt=poison)
    summary = run_extract(
        extract_config([corpus], on_nonfinite="skip"),
        provider,
        llama.tokenizer,
        out_dir=tmp_path / "b",
    )
    dropped = summary.stats.dropped_rows["nonfinite_vector"]
    assert dropped == len(provider.calls) > 0  # one poisoned row per model call
    assert summary.stats.rows == 4 * summary.stats.docs_used - dropped


def test_provider_shape_and_layer_mismatches_are_errors(llama, tmp_path):
    """A provider that returns the wrong shape, or reads another layer than the config asks,
    must be refused with a message naming the document / both layers."""
    corpus = write_jsonl(tmp_path / "c.jsonl", documents(3, seed=7))
    bad = RecordingProvider(llama.provider(), corrupt=lambda out: [o[:, :10] for o in out])
    with pytest.raises(ExtractError, match=r"returned shape \(4, 10\) for document"):
        run_extract(extract_config([corpus]), bad, llama.tokenizer, out_dir=tmp_path / "a")
    with pytest.raises(
        ExtractError, match="extract.layer=1 but the activation provider reads layer 2"
    ):
        run_extract(
            extract_config([corpus], layer=1),
            llama.provider(),
            llama.tokenizer,
            out_dir=tmp_path / "b",
        )


def test_resuming_with_other_settings_is_refused(llama, tmp_path):
    """A directory holds one extraction: resuming it with another seed (or corpus, layer, ...)
    would mix two datasets, so it must fail naming what changed."""
    corpus = write_jsonl(tmp_path / "c.jsonl", documents(3, seed=8))
    run_extract(extract_config([corpus]), llama.provider(), llama.tokenizer, out_dir=tmp_path / "x")
    with pytest.raises(ExtractError, match="seed: was 0, now 1"):
        run_extract(
            extract_config([corpus], seed=1),
            llama.provider(),
            llama.tokenizer,
            out_dir=tmp_path / "x",
        )
