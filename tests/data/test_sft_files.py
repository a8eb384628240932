"""The SFT file reader: good files round-trip, every file- and row-level refusal names the file,
the row and the problem, skip_bad_rows counts by reason, and data made for another model is
refused. The good files are made by the real build stage; the bad ones are rewrites of them."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nla_mcore import prompts
from nla_mcore.data import sft_files
from nla_mcore.data.sft_files import DataError, check_against_model, read_sft_file
from nla_mcore.datagen.build import CHAT_PROMPT_TYPE, build_split
from nla_mcore.datagen.datagen_config import BuildConfig
from nla_mcore.datagen.parquet_io import vector_type
from nla_mcore.sidecar import (
    dataset_sidecar_path,
    read_dataset_sidecar,
    write_dataset_sidecar,
)
from nla_mcore.toy_tokenizers import build_toy_tokenizer
from tests.train.sft_toys import write_explained

D = 8
N = 10
LAYER = 2


def explanation(i: int) -> str:
    return f"Feature one of row {i}. Feature two."


def explained_file(path: Path, tokenizer) -> Path:
    """An Explain-stage output with its sidecar: row i has vector arange(i*D, (i+1)*D)."""
    return write_explained(
        path,
        tokenizer,
        vectors_ND=np.arange(N * D, dtype=np.float32).reshape(N, D),
        explanations=[explanation(i) for i in range(N)],
        doc_ids=[f"doc-{i // 2}" for i in range(N)],
        layer=LAYER,
        row_group_size=3,
    )


@pytest.fixture(scope="module")
def llama_tokenizer():
    return build_toy_tokenizer("llama")


@pytest.fixture(scope="module")
def built(tmp_path_factory, llama_tokenizer) -> dict[str, Path]:
    """Real av_sft / ar_sft files (and the ar_sft activation-shuffled baseline) from build."""
    root = tmp_path_factory.mktemp("built")
    src = explained_file(root / "explained.parquet", llama_tokenizer)
    cfg = BuildConfig(progress=False, batch_rows=4)
    out = {}
    for stage in ("av_sft", "ar_sft"):
        out[stage] = root / f"{stage}.parquet"
        build_split(cfg, stage, src, out[stage], llama_tokenizer)
    (root / "shuffle").mkdir()  # build opens its vector spool before creating the directory
    shuffled_cfg = BuildConfig(progress=False, batch_rows=4, activation_shuffle_baseline=True)
    summary = build_split(
        shuffled_cfg, "ar_sft", src, root / "shuffle" / "ar_sft.parquet", llama_tokenizer
    )
    out["shuffled"] = Path(summary.shuffled_path)
    return out


def rewrite(good: Path, dst: Path, table: pa.Table) -> Path:
    """`table` written at `dst`, with the sidecar of `good` beside it."""
    pq.write_table(table, dst, row_group_size=4)
    shutil.copyfile(dataset_sidecar_path(good), dataset_sidecar_path(dst))
    return dst


def with_column(table: pa.Table, name: str, values: list, kind: pa.DataType) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, pa.array(values, kind))


def vectors_list(table: pa.Table) -> list:
    return table.column("activation_vector").to_pylist()


def refusal(path: Path, stage: str, **kwargs) -> str:
    with pytest.raises(DataError) as caught:
        read_sft_file(path, stage, **kwargs)
    return str(caught.value)


# --- good files --------------------------------------------------------------------------------


def test_av_sft_round_trip(built):
    """What build wrote is what training gets: chats with <INJECT>, responses, vectors, rows."""
    rows = read_sft_file(built["av_sft"], "av_sft")
    assert rows.stage == "av_sft" and rows.rows_in_file == N and rows.skipped == Counter()
    assert rows.prompts == [prompts.av_messages(prompts.INJECT_PLACEHOLDER)] * N
    assert rows.responses == [prompts.format_av_target(explanation(i)) for i in range(N)]
    np.testing.assert_array_equal(rows.rows_N, np.arange(N))
    assert rows.rows_N.dtype == np.int64
    assert rows.vectors_ND.dtype == np.float32
    np.testing.assert_array_equal(rows.vectors_ND, np.arange(N * D).reshape(N, D))
    assert rows.doc_ids == [f"doc-{i // 2}" for i in range(N)]
    assert rows.sidecar.stage == "av_sft" and rows.sidecar.extraction.d_model == D
    assert rows.describe_row(7) == "av_sft.parquet row 7 (doc_id 'doc-3')"


def test_ar_sft_round_trip(built):
    """ar_sft prompts are the AR strings of the explanations; there is no response."""
    rows = read_sft_file(built["ar_sft"], "ar_sft")
    assert rows.prompts == [prompts.format_ar_prompt(explanation(i)) for i in range(N)]
    assert rows.responses is None
    np.testing.assert_array_equal(rows.vectors_ND, np.arange(N * D).reshape(N, D))
    np.testing.assert_array_equal(rows.rows_N, np.arange(N))


def test_variable_size_vector_lists_and_null_doc_ids_are_accepted(built, tmp_path):
    """list<float> vectors of the right width (older writers) and null doc_ids ("") are usable."""
    table = pq.read_table(built["av_sft"])
    table = with_column(table, "activation_vector", vectors_list(table), pa.list_(pa.float64()))
    table = with_column(table, "doc_id", [None] * N, pa.string())
    rows = read_sft_file(rewrite(built["av_sft"], tmp_path / "av.parquet", table), "av_sft")
    np.testing.assert_array_equal(rows.vectors_ND, np.arange(N * D).reshape(N, D))
    assert rows.doc_ids == [""] * N and rows.describe_row(0) == "av.parquet row 0"


# --- file-level refusals -----------------------------------------------------------------------


def test_missing_file_is_refused(tmp_path):
    """A wrong path fails before anything else, naming it."""
    message = refusal(tmp_path / "nope.parquet", "av_sft")
    assert "nope.parquet does not exist" in message


def test_truncated_parquet_is_refused(built, tmp_path):
    """A half-copied file is not a parquet: refused at open, not in the middle of training."""
    data = built["av_sft"].read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    message = refusal(tmp_path / "cut.parquet", "av_sft")
    assert "cut.parquet is not a readable parquet file" in message


def test_file_without_rows_is_refused(built, tmp_path):
    """An empty file would give an empty data loader (a hang or a divide by zero later)."""
    table = pq.read_table(built["av_sft"]).slice(0, 0)
    message = refusal(rewrite(built["av_sft"], tmp_path / "empty.parquet", table), "av_sft")
    assert "empty.parquet has no rows" in message


def test_missing_sidecar_is_refused(built, tmp_path):
    """Without the sidecar there is no d_model, layer or marker to check the data against."""
    shutil.copyfile(built["av_sft"], tmp_path / "bare.parquet")
    message = refusal(tmp_path / "bare.parquet", "av_sft")
    assert "bare.parquet has no sidecar bare.parquet.nla_meta.yaml" in message


def test_unreadable_sidecar_is_refused(built, tmp_path):
    """A broken sidecar is an error naming the file, with the YAML parser's reason kept."""
    shutil.copyfile(built["av_sft"], tmp_path / "bad.parquet")
    dataset_sidecar_path(tmp_path / "bad.parquet").write_text("kind: [unclosed\n")
    message = refusal(tmp_path / "bad.parquet", "av_sft")
    assert "bad.parquet: its sidecar cannot be used" in message and "not valid YAML" in message


def test_file_of_another_stage_is_refused(built):
    """An ar_sft file given as av_sft (a swapped config path) says which stage it is."""
    message = refusal(built["ar_sft"], "av_sft")
    assert "ar_sft.parquet: its sidecar says stage 'ar_sft', expected 'av_sft'" in message


def test_activation_shuffled_baseline_is_refused(built):
    """The control baseline has permuted vectors; training on it would silently learn noise."""
    message = refusal(built["shuffled"], "ar_sft")
    assert "ar_sft-activation-shuffled.parquet" in message and "not training data" in message


def test_missing_columns_are_named(built, tmp_path):
    """A file without `response` says which columns are missing and which exist."""
    table = pq.read_table(built["av_sft"]).drop_columns(["response", "doc_id"])
    message = refusal(rewrite(built["av_sft"], tmp_path / "cols.parquet", table), "av_sft")
    assert "cols.parquet has no column 'response', 'doc_id' (it has: prompt," in message


def test_vector_column_that_is_not_float_lists_is_refused(built, tmp_path):
    """Integer vectors (or strings) are a schema error, not a per-row one."""
    table = pq.read_table(built["av_sft"])
    ints = [[int(x) for x in row] for row in vectors_list(table)]
    table = with_column(table, "activation_vector", ints, pa.list_(pa.int64()))
    message = refusal(rewrite(built["av_sft"], tmp_path / "ints.parquet", table), "av_sft")
    assert "ints.parquet: column 'activation_vector'" in message
    assert "expected a list of floats" in message


def test_prompt_column_of_the_wrong_type_is_refused(built, tmp_path):
    """An av_sft prompt stored as a plain string (not chat messages) is refused as a schema."""
    table = pq.read_table(built["av_sft"])
    table = with_column(table, "prompt", ["<INJECT>"] * N, pa.string())
    message = refusal(rewrite(built["av_sft"], tmp_path / "str.parquet", table), "av_sft")
    assert "str.parquet: column 'prompt' is string: expected list<" in message


def test_fixed_width_other_than_the_sidecar_d_model_is_refused(built, tmp_path):
    """Vectors of width 4 with a sidecar saying d_model=8 come from another model or a bug."""
    table = pq.read_table(built["av_sft"])
    narrow = [row[:4] for row in vectors_list(table)]
    table = with_column(table, "activation_vector", narrow, vector_type(4))
    message = refusal(rewrite(built["av_sft"], tmp_path / "narrow.parquet", table), "av_sft")
    assert "narrow.parquet" in message
    assert "vectors have d=4, its sidecar says extraction.d_model=8" in message


# --- row-level refusals ------------------------------------------------------------------------


def set_row(values: list, row: int, value) -> list:
    values = list(values)
    values[row] = value
    return values


def null_vector(table):
    return with_column(
        table, "activation_vector", set_row(vectors_list(table), 4, None), vector_type(D)
    )


def ragged_vector(table):
    ragged = set_row(vectors_list(table), 4, [1.0, 2.0, 3.0])
    return with_column(table, "activation_vector", ragged, pa.list_(pa.float32()))


def nan_vector(table):
    return with_column(
        table,
        "activation_vector",
        set_row(vectors_list(table), 4, [1.0] * (D - 1) + [float("nan")]),
        vector_type(D),
    )


def inf_vector(table):
    return with_column(
        table,
        "activation_vector",
        set_row(vectors_list(table), 4, [float("-inf")] + [1.0] * (D - 1)),
        vector_type(D),
    )


def zero_vector(table):
    return with_column(
        table, "activation_vector", set_row(vectors_list(table), 4, [0.0] * D), vector_type(D)
    )


def chat(table, value):
    return with_column(
        table, "prompt", set_row(table.column("prompt").to_pylist(), 4, value), CHAT_PROMPT_TYPE
    )


def null_chat(table):
    return chat(table, None)


def empty_chat(table):
    return chat(table, [])


def null_content(table):
    return chat(
        table,
        [{"role": "system", "content": None}, *prompts.av_messages(prompts.INJECT_PLACEHOLDER)],
    )


def no_inject(table):
    return chat(table, [{"role": "user", "content": "no slot here"}])


def two_injects(table):
    return chat(
        table,
        [
            {"role": "system", "content": "<INJECT>"},
            *prompts.av_messages(prompts.INJECT_PLACEHOLDER),
        ],
    )


def response(table, value):
    return with_column(
        table, "response", set_row(table.column("response").to_pylist(), 4, value), pa.string()
    )


def null_response(table):
    return response(table, None)


def blank_response(table):
    return response(table, "  \n")


def unparseable_response(table):
    return response(table, "Feature one. Feature two.")


def ar_prompt(table, value):
    return with_column(
        table, "prompt", set_row(table.column("prompt").to_pylist(), 4, value), pa.string()
    )


def null_ar_prompt(table):
    return ar_prompt(table, None)


def ar_prompt_without_suffix(table):
    return ar_prompt(table, "Summary of the following text: <text>words</text>")


ROW_CASES = [
    ("av_sft", null_vector, "activation_vector is null"),
    ("av_sft", ragged_vector, "activation_vector has the wrong length (expected d_model=8)"),
    ("av_sft", nan_vector, "activation_vector has NaN/inf entries"),
    ("av_sft", inf_vector, "activation_vector has NaN/inf entries"),
    ("av_sft", zero_vector, "activation_vector is all zeros"),
    ("av_sft", null_chat, "prompt is null or empty"),
    ("av_sft", empty_chat, "prompt is null or empty"),
    ("av_sft", null_content, "prompt is not a list of {role, content} messages"),
    ("av_sft", no_inject, "prompt does not contain <INJECT> exactly once"),
    ("av_sft", two_injects, "prompt does not contain <INJECT> exactly once"),
    ("av_sft", null_response, "response is null or empty"),
    ("av_sft", blank_response, "response is null or empty"),
    ("av_sft", unparseable_response, "response has no <explanation>"),
    ("ar_sft", null_ar_prompt, "prompt is null or empty"),
    ("ar_sft", ar_prompt_without_suffix, "prompt does not end with the AR suffix"),
    ("ar_sft", nan_vector, "activation_vector has NaN/inf entries"),
]


@pytest.mark.parametrize(
    "stage, corrupt, problem", ROW_CASES, ids=[f"{s}-{c.__name__}" for s, c, _ in ROW_CASES]
)
def test_bad_row_is_refused_naming_file_row_doc_and_problem(
    built, tmp_path, stage, corrupt, problem
):
    """One bad row (row 4, doc-2) fails the whole file by default, saying where and what."""
    table = corrupt(pq.read_table(built[stage]))
    path = rewrite(built[stage], tmp_path / "bad.parquet", table)
    message = refusal(path, stage)
    assert f"bad.parquet: row 4 (doc_id 'doc-2'): {problem}" in message
    assert "(1 row like this); set data.skip_bad_rows=true" in message


def test_refusal_counts_every_row_with_the_problem(built, tmp_path, monkeypatch):
    """The message names the first bad row and how many share the problem, across batches."""
    monkeypatch.setattr(sft_files, "BATCH_VALUES", 3 * D)  # 3-row batches
    table = pq.read_table(built["av_sft"])
    vectors = vectors_list(table)
    for row in (5, 6, 9):
        vectors[row][1] = float("nan")
    table = with_column(table, "activation_vector", vectors, vector_type(D))
    message = refusal(rewrite(built["av_sft"], tmp_path / "nan.parquet", table), "av_sft")
    assert re.search(
        r"nan\.parquet: row 5 \(doc_id 'doc-2'\): activation_vector has NaN/inf entries "
        r"\(3 rows like this\); set data\.skip_bad_rows=true to drop such rows",
        message,
    )


def test_skip_bad_rows_drops_and_counts_by_reason(built, tmp_path, monkeypatch):
    """With skip_bad_rows two rows of different problems are dropped and counted; the rest keep
    their own row numbers, vectors and texts, also when batches split the file."""
    monkeypatch.setattr(sft_files, "BATCH_VALUES", 3 * D)
    table = pq.read_table(built["av_sft"])
    vectors = vectors_list(table)
    vectors[2] = [0.0] * D
    table = with_column(table, "activation_vector", vectors, vector_type(D))
    table = with_column(
        table,
        "response",
        set_row(table.column("response").to_pylist(), 7, "no tags"),
        pa.string(),
    )
    path = rewrite(built["av_sft"], tmp_path / "two.parquet", table)
    message = refusal(path, "av_sft")
    assert "row 2 (doc_id 'doc-1'): activation_vector is all zeros" in message
    assert "row 7 (doc_id 'doc-3'): response has no <explanation>" in message
    rows = read_sft_file(path, "av_sft", skip_bad_rows=True)
    kept = [i for i in range(N) if i not in (2, 7)]
    assert rows.skipped == Counter(zero_vector=1, unparseable_response=1)
    np.testing.assert_array_equal(rows.rows_N, kept)
    np.testing.assert_array_equal(rows.vectors_ND, np.arange(N * D).reshape(N, D)[kept])
    assert rows.responses == [prompts.format_av_target(explanation(i)) for i in kept]
    assert rows.doc_ids == [f"doc-{i // 2}" for i in kept] and len(rows.prompts) == len(kept)
    assert rows.describe_row(2) == "two.parquet row 3 (doc_id 'doc-1')"


def test_a_row_with_several_problems_counts_once(built, tmp_path):
    """A row is dropped once, under its first problem, so the counts add up to the rows dropped."""
    table = null_response(nan_vector(pq.read_table(built["av_sft"])))
    path = rewrite(built["av_sft"], tmp_path / "both.parquet", table)
    rows = read_sft_file(path, "av_sft", skip_bad_rows=True)
    assert rows.skipped == Counter(nonfinite_vector=1) and len(rows.rows_N) == N - 1


def test_every_row_dropped_is_an_error(built, tmp_path):
    """skip_bad_rows must not turn a wholly broken file into an empty training set."""
    table = pq.read_table(built["ar_sft"])
    table = with_column(table, "activation_vector", [[0.0] * D] * N, vector_type(D))
    path = rewrite(built["ar_sft"], tmp_path / "zeros.parquet", table)
    message = refusal(path, "ar_sft", skip_bad_rows=True)
    assert "zeros.parquet: all 10 rows are bad, nothing to train on" in message
    assert "row 0 (doc_id 'doc-0'): activation_vector is all zeros (zero norm) (10 rows" in message


# --- the model ---------------------------------------------------------------------------------


def test_check_against_model_accepts_the_model_the_data_was_made_for(built, llama_tokenizer):
    """The same base model (d, layer, tokenizer) passes for both stages."""
    for stage in ("av_sft", "ar_sft"):
        rows = read_sft_file(built[stage], stage)
        check_against_model(rows, d_model=D, extraction_layer=LAYER, tokenizer=llama_tokenizer)
        check_against_model(rows, d_model=D, extraction_layer=None, tokenizer=llama_tokenizer)


def test_check_against_model_refuses_another_width_or_layer(built, llama_tokenizer):
    """Vectors of another width or layer would be injected into a model that never saw them."""
    rows = read_sft_file(built["av_sft"], "av_sft")
    with pytest.raises(DataError, match=r"extraction\.d_model drifted: expected 16 .*found 8"):
        check_against_model(rows, d_model=16, extraction_layer=LAYER, tokenizer=llama_tokenizer)
    with pytest.raises(DataError, match=r"extraction\.layer_index drifted: expected 3 .*found 2"):
        check_against_model(rows, d_model=D, extraction_layer=3, tokenizer=llama_tokenizer)


def test_check_against_model_refuses_another_tokenizer_family(built):
    """Llama-built data with a Qwen tokenizer: the marker id drifted, named in the message."""
    qwen = build_toy_tokenizer("qwen2")
    rows = read_sft_file(built["av_sft"], "av_sft")
    with pytest.raises(DataError) as caught:
        check_against_model(rows, d_model=D, extraction_layer=LAYER, tokenizer=qwen)
    message = str(caught.value)
    assert "tokens.injection_token_id drifted" in message
    assert "must come from the same base model" in message and "av_sft.parquet" in message


def test_check_against_model_refuses_a_drifted_ar_suffix(built, tmp_path, llama_tokenizer):
    """An ar_sft sidecar whose critic_suffix_ids disagree with the tokenizer is refused."""
    path = tmp_path / "ar_sft.parquet"
    shutil.copyfile(built["ar_sft"], path)
    sidecar = read_dataset_sidecar(built["ar_sft"])
    sidecar.tokens.critic_suffix_ids = [*sidecar.tokens.critic_suffix_ids, 7]
    write_dataset_sidecar(path, sidecar)
    rows = read_sft_file(path, "ar_sft")
    with pytest.raises(DataError, match=r"tokens\.critic_suffix_ids drifted"):
        check_against_model(rows, d_model=D, extraction_layer=LAYER, tokenizer=llama_tokenizer)
