"""Build stage: training files' schemas and sidecars, dropped rows by reason, input validation,
and the activation-shuffle baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nla_mcore import prompts
from nla_mcore.datagen.build import CHAT_PROMPT_TYPE, build_split
from nla_mcore.datagen.datagen_config import BuildConfig
from nla_mcore.sidecar import (
    DatasetExtraction,
    DatasetSidecar,
    PromptTemplates,
    SidecarDriftError,
    check_ar_suffix,
    check_marker,
    make_tokens,
    read_dataset_sidecar,
    write_dataset_sidecar,
)
from nla_mcore.toy_tokenizers import build_toy_tokenizer

D = 8
API = {"model": "offline-v1", "max_tokens": 1024, "temperature": None, "instruction_prompt": "x"}


@pytest.fixture(scope="module")
def llama_tokenizer():
    return build_toy_tokenizer("llama")


def explained_file(
    path: Path,
    tokenizer,
    n: int = 10,
    *,
    failures: dict[int, str] | None = None,
    vectors: np.ndarray | None = None,
    explained: bool = True,
    d_model: int = D,
) -> Path:
    """An Explain-stage output with the real columns, its sidecar (marker of `tokenizer`)."""
    vec_ND = np.arange(n * D, dtype=np.float32).reshape(n, D) if vectors is None else vectors
    failures = failures or {}
    columns = {
        "n_raw_tokens": pa.array([51 + i for i in range(n)], pa.int64()),
        "detokenized_text_truncated": pa.array([f"text {i}" for i in range(n)]),
        "activation_vector": pa.FixedSizeListArray.from_arrays(pa.array(vec_ND.ravel()), D),
        "activation_layer": pa.array([2] * n, pa.int64()),
        "doc_id": pa.array([f"doc-{i // 2}" for i in range(n)]),
        "position": pa.array([50 + i for i in range(n)], pa.int64()),
    }
    if explained:
        columns["explanation"] = pa.array(
            [None if i in failures else f"Feature one of row {i}. Feature two." for i in range(n)]
        )
        columns["explain_status"] = pa.array(
            ["failed" if i in failures else "ok" for i in range(n)]
        )
        columns["explain_failure"] = pa.array([failures.get(i) for i in range(n)], pa.string())
    pq.write_table(pa.table(columns), path, row_group_size=3)
    sidecar = DatasetSidecar(
        stage="base",
        row_count=n,
        extraction=DatasetExtraction(
            base_model="toy", d_model=d_model, layer_index=2, positions_per_doc=2
        ),
        tokens=make_tokens(tokenizer),
        prompt_templates=PromptTemplates(),
        api_summaries=API if explained else None,
    )
    write_dataset_sidecar(path, sidecar)
    return path


def cfg(**overrides) -> BuildConfig:
    return BuildConfig(progress=False, batch_rows=4, **overrides)


def test_av_sft_prompt_response_schema_and_sidecar(tmp_path, llama_tokenizer):
    """av_sft rows: the chat prompt with the literal <INJECT> slot (list<struct<role, content>>),
    the wrapped explanation as response, the raw vector, provenance; the sidecar passes the
    loaders' marker check and carries the explainer's api_summaries and its parent."""
    src = explained_file(tmp_path / "in.parquet", llama_tokenizer)
    summary = build_split(cfg(), "av_sft", src, tmp_path / "av_sft.parquet", llama_tokenizer)
    table = pq.read_table(tmp_path / "av_sft.parquet")
    assert table.schema.field("prompt").type == CHAT_PROMPT_TYPE
    assert table.column_names == [
        "prompt",
        "response",
        "activation_vector",
        "doc_id",
        "position",
        "n_raw_tokens",
        "activation_layer",
        "detokenized_text_truncated",
    ]
    row = table.slice(3, 1).to_pylist()[0]
    assert row["prompt"] == prompts.av_messages(prompts.INJECT_PLACEHOLDER)
    assert row["prompt"][0]["content"].count("<concept><INJECT></concept>") == 1
    assert row["response"] == "<explanation>\nFeature one of row 3. Feature two.\n</explanation>"
    assert row["activation_vector"] == list(np.arange(24, 32, dtype=np.float32))
    sidecar = read_dataset_sidecar(tmp_path / "av_sft.parquet")
    assert (sidecar.stage, sidecar.row_count, summary.rows_out) == ("av_sft", 10, 10)
    assert sidecar.api_summaries == API and sidecar.parent_datasets == [str(src)]
    check_marker(sidecar, llama_tokenizer)


def test_ar_sft_prompts_end_in_the_checked_suffix(tmp_path, llama_tokenizer):
    """ar_sft prompts are the AR template around the explanation; tokenised with special tokens
    (a BOS for Llama) they must end in the sidecar's critic_suffix_ids, which the loaders check."""
    src = explained_file(tmp_path / "in.parquet", llama_tokenizer)
    build_split(cfg(keep_text=False), "ar_sft", src, tmp_path / "ar.parquet", llama_tokenizer)
    table = pq.read_table(tmp_path / "ar.parquet")
    assert table.schema.field("prompt").type == pa.string()
    assert "detokenized_text_truncated" not in table.column_names
    sidecar = read_dataset_sidecar(tmp_path / "ar.parquet")
    suffix = check_ar_suffix(sidecar, llama_tokenizer)
    assert suffix == sidecar.tokens.critic_suffix_ids
    for prompt in table.column("prompt").to_pylist():
        assert prompt.endswith("</text> <summary>")
        ids = llama_tokenizer(prompt, add_special_tokens=True)["input_ids"]
        assert ids[0] == llama_tokenizer.bos_token_id and ids[-len(suffix) :] == suffix


def test_rl_has_no_response_and_keeps_unexplained_rows(tmp_path, llama_tokenizer):
    """RL needs only the prompt and the vector: an unexplained split builds, nothing is dropped."""
    src = explained_file(tmp_path / "in.parquet", llama_tokenizer, explained=False)
    summary = build_split(cfg(), "rl", src, tmp_path / "rl.parquet", llama_tokenizer)
    table = pq.read_table(tmp_path / "rl.parquet")
    assert "response" not in table.column_names and table.num_rows == summary.rows_out == 10
    assert read_dataset_sidecar(tmp_path / "rl.parquet").api_summaries is None


def test_failed_explanations_are_dropped_and_counted_by_reason(tmp_path, llama_tokenizer):
    """An SFT row whose explanation failed cannot be trained on: it is dropped and counted under
    its Explain failure reason, and the sidecar's row_count matches what was written."""
    failures = {1: "refusal", 4: "truncated", 7: "truncated"}
    src = explained_file(tmp_path / "in.parquet", llama_tokenizer, failures=failures)
    summary = build_split(cfg(), "av_sft", src, tmp_path / "o.parquet", llama_tokenizer)
    assert dict(summary.dropped) == {
        "explain_failed:refusal": 1,
        "explain_failed:truncated": 2,
    }
    kept = pq.read_table(tmp_path / "o.parquet").column("position").to_pylist()
    assert kept == [50 + i for i in range(10) if i not in failures]
    assert read_dataset_sidecar(tmp_path / "o.parquet").row_count == 7


def test_nan_vectors_error_naming_file_and_row_or_are_counted(tmp_path, llama_tokenizer):
    """A NaN in a vector file must fail naming the file, the row and the document, and leave no
    output behind; with on_nonfinite=skip it is dropped and counted."""
    vectors = np.ones((10, D), np.float32)
    vectors[5, 2] = np.nan
    vectors[8, 0] = np.inf
    src = explained_file(tmp_path / "in.parquet", llama_tokenizer, vectors=vectors)
    out = tmp_path / "o.parquet"
    with pytest.raises(ValueError, match=r"in.parquet: row 5 \(doc_id 'doc-2'\) has a NaN/inf"):
        build_split(cfg(), "av_sft", src, out, llama_tokenizer)
    assert not out.exists() and not list(tmp_path.glob(".o.parquet*"))
    summary = build_split(cfg(on_nonfinite="skip"), "av_sft", src, out, llama_tokenizer)
    assert summary.dropped == {"nonfinite_vector": 2} and summary.rows_out == 8


def test_inputs_with_wrong_width_or_missing_pieces_are_refused(tmp_path, llama_tokenizer):
    """Vectors whose width is not the sidecar's d_model, a parquet without a sidecar, and an
    activation file given where an explained one is needed must each fail with the reason."""
    wrong_d = explained_file(tmp_path / "d.parquet", llama_tokenizer, d_model=16)
    with pytest.raises(
        ValueError, match="vectors have d=8, its sidecar says extraction.d_model=16"
    ):
        build_split(cfg(), "av_sft", wrong_d, tmp_path / "o.parquet", llama_tokenizer)
    bare = tmp_path / "bare.parquet"
    pq.write_table(pq.read_table(wrong_d), bare)
    with pytest.raises(FileNotFoundError, match="no NLA sidecar at .*bare.parquet.nla_meta.yaml"):
        build_split(cfg(), "av_sft", bare, tmp_path / "o.parquet", llama_tokenizer)
    raw = explained_file(tmp_path / "raw.parquet", llama_tokenizer, explained=False)
    with pytest.raises(
        ValueError, match=r"has no column 'explanation'.*: pass the Explain stage's output"
    ):
        build_split(cfg(), "ar_sft", raw, tmp_path / "o.parquet", llama_tokenizer)
    ragged = tmp_path / "ragged.parquet"
    table = pq.read_table(raw).set_column(
        2, "activation_vector", pa.array([[1.0] * D] * 9 + [[1.0] * 3], pa.list_(pa.float32()))
    )
    pq.write_table(table, ragged)
    (tmp_path / "ragged.parquet.nla_meta.yaml").write_bytes(
        (tmp_path / "raw.parquet.nla_meta.yaml").read_bytes()
    )
    with pytest.raises(ValueError, match="row 9 has a vector of length 3, expected d_model=8"):
        build_split(cfg(), "rl", ragged, tmp_path / "o.parquet", llama_tokenizer)


def test_marker_drift_between_extraction_and_build_is_caught(tmp_path, llama_tokenizer):
    """Building with a tokenizer other than the one the data was extracted with (here Qwen's
    after Llama's) must fail naming the drifted marker field, not write misaligned ids."""
    src = explained_file(tmp_path / "in.parquet", llama_tokenizer)
    with pytest.raises(SidecarDriftError, match="tokens.injection_token_id drifted"):
        build_split(cfg(), "av_sft", src, tmp_path / "o.parquet", build_toy_tokenizer("qwen2"))


def test_activation_shuffle_baseline_permutes_vectors_only(tmp_path, llama_tokenizer):
    """The control baseline keeps every row but gives each one another row's vector (a single
    cycle: no row keeps its own), reproducibly by seed, and its sidecar says it is a baseline."""
    src = explained_file(tmp_path / "in.parquet", llama_tokenizer, n=11, failures={3: "refusal"})
    summary = build_split(
        cfg(activation_shuffle_baseline=True, shuffle_seed=5),
        "ar_sft",
        src,
        tmp_path / "ar_sft.parquet",
        llama_tokenizer,
    )
    assert summary.shuffled_path == str(tmp_path / "ar_sft-activation-shuffled.parquet")
    built = pq.read_table(tmp_path / "ar_sft.parquet")
    shuffled = pq.read_table(summary.shuffled_path)
    assert shuffled.drop_columns(["activation_vector"]).equals(
        built.drop_columns(["activation_vector"])
    )
    original = np.array(built.column("activation_vector").to_pylist())
    permuted = np.array(shuffled.column("activation_vector").to_pylist())
    assert sorted(map(tuple, original)) == sorted(map(tuple, permuted))
    assert not (original == permuted).all(axis=1).any()
    sidecar = read_dataset_sidecar(summary.shuffled_path)
    assert sidecar.extra["activation_shuffle"]["seed"] == 5 and sidecar.row_count == 10
    assert not list(tmp_path.glob(".*.npy"))
