"""Read and validate the SFT training files that `datagen build` writes, before training starts.

    read_sft_file(path, "av_sft" | "ar_sft", skip_bad_rows=False) -> SFTRows  (kept rows, file order)
    check_against_model(rows, d_model=, extraction_layer=, tokenizer=)  (refuse another model's data)

Design decisions and trade-offs:

- **Every row is checked up front.** A bad row met at step 40k crashes one rank and leaves the
  others waiting in a collective; here it is a `DataError` before the first step, naming the file,
  the row (0-based, in the parquet), its doc_id, the column and how many rows share the problem.
  The whole file is scanned before raising, so the count is the real one and one fix suffices.
- **File-level problems always fail; row-level ones fail unless `skip_bad_rows`.** File level:
  missing or unreadable file, no rows, missing/unreadable sidecar, a sidecar of another stage or
  of the activation-shuffled control baseline, missing columns, a column of the wrong Arrow type
  (a `prompt` of the wrong type is one schema error, not a million row errors), a fixed vector
  width other than the sidecar's `extraction.d_model`. Row level (`ROW_PROBLEMS`): null, ragged,
  NaN/inf or all-zero vectors, empty prompts, chats with a null message/role/content or without
  exactly one `<INJECT>`, ar_sft prompts that do not end in the AR suffix text of the sidecar's
  `prompt_templates.ar` (the AR reads its vector at the last token; build drops such rows too),
  empty or unparseable responses. With `skip_bad_rows` they are dropped and counted by reason; a
  row with several problems counts once, under the first in `ROW_PROBLEMS` order.
- **Streaming and vectorised.** `ParquetFile(memory_map=True).iter_batches` over the needed
  columns only, ~64 MiB of vector entries per batch. Vectors are checked as `[N, D]` numpy arrays
  (a zero-copy view of a fixed-size list column; variable-size lists get a per-row length check).
  The kept vectors are copied into one `np.empty([rows_in_file, D])`, so peak memory is one copy
  of the vectors plus one batch (pages of dropped rows are never touched).
- **Strings are shared.** Every av_sft row repeats the same chat template: equal message strings
  become one Python object (dictionary encoding), not one ~700-byte copy per row.
- **Nothing is written.** A sidecar `row_count` that differs from the file is logged, not refused:
  the rows themselves are what is checked.

Legend: N = rows (of a batch, or kept), D = d_model, M = chat messages of a batch.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nla_mcore import prompts
from nla_mcore.datagen.build import CHAT_PROMPT_TYPE
from nla_mcore.datagen.parquet_io import VECTOR_COLUMN
from nla_mcore.prompts import INJECT_PLACEHOLDER, PromptError
from nla_mcore.sidecar import (
    DatasetSidecar,
    SidecarError,
    check_ar_suffix,
    check_marker,
    dataset_sidecar_path,
    read_dataset_sidecar,
)

log = logging.getLogger(__name__)

STAGES = ("av_sft", "ar_sft")
BATCH_VALUES = 1 << 24
"""Vector entries per streamed batch (64 MiB of float32: 2048 rows at d=8192)."""
SKIP_HINT = "set data.skip_bad_rows=true to drop such rows (they are counted)"
ROW_PROBLEMS = {
    "null_vector": f"{VECTOR_COLUMN} is null",
    "ragged_vector": f"{VECTOR_COLUMN} has the wrong length (expected d_model={{d_model}})",
    "nonfinite_vector": f"{VECTOR_COLUMN} has NaN/inf entries",
    "zero_vector": f"{VECTOR_COLUMN} is all zeros (zero norm)",
    "empty_prompt": "prompt is null or empty",
    "bad_chat_prompt": "prompt is not a list of {{role, content}} messages (a null message, "
    "role or content)",
    "inject_count": f"prompt does not contain {INJECT_PLACEHOLDER} exactly once over its messages",
    "no_ar_suffix": "prompt does not end with the AR suffix {suffix!r} of prompt_templates.ar",
    "empty_response": "response is null or empty",
    "unparseable_response": "response has no <explanation>...</explanation> "
    "(prompts.parse_explanation fails)",
}
"""Row-level problems, in the order that decides the reason of a row with several."""


class DataError(ValueError):
    """Training data that cannot be used; the message names the file, the row and the column."""


@dataclass(kw_only=True, slots=True)
class SFTRows:
    """The kept rows of one SFT file, in file order, with the file's validated sidecar."""

    path: Path
    stage: str
    """"av_sft" | "ar_sft"."""
    sidecar: DatasetSidecar
    rows_N: np.ndarray
    """int64 [N]: row numbers (0-based, in the file) of the kept rows."""
    prompts: list
    """ar_sft: list[str]; av_sft: list[list[dict[str, str]]] (role/content, with `<INJECT>`)."""
    responses: list[str] | None
    """av_sft: the target responses; ar_sft: None."""
    vectors_ND: np.ndarray
    """float32 [N, D]: the raw activation vectors of the kept rows."""
    doc_ids: list[str]
    """"" where the file has a null doc_id."""
    skipped: Counter
    """Reason (a ROW_PROBLEMS key) -> rows dropped; empty unless skip_bad_rows."""
    rows_in_file: int

    def describe_row(self, i: int) -> str:
        """Kept sample `i` for messages: "av_sft.parquet row 17 (doc_id 'doc-3')"."""
        return f"{self.path.name} row {int(self.rows_N[i])}{_doc_part(self.doc_ids[i] or None)}"


@dataclass(slots=True)
class _BadRows:
    """The rows with one problem: the first (row, doc_id) and how many."""

    first_row: int
    doc_id: str | None
    count: int = 0


@dataclass(slots=True)
class _Scan:
    """One pass over a file: what the checks need, the rows kept so far, the bad rows."""

    path: Path
    stage: str
    what: str
    d_model: int
    ar_suffix: str | None
    vectors_ND: np.ndarray
    """[rows_in_file, D]; the first `kept` rows are filled."""
    kept: int = 0
    rows: list[np.ndarray] = field(default_factory=list)
    prompts: list = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    doc_ids: list[str] = field(default_factory=list)
    bad: dict[str, _BadRows] = field(default_factory=dict)


# --- the file and its sidecar ------------------------------------------------------------------


def read_sft_file(
    path: str | Path, stage: str, *, skip_bad_rows: bool = False, what: str = "training file"
) -> SFTRows:
    """The kept rows of the `stage` file at `path`, after every check (`DataError` otherwise)."""
    if stage not in STAGES:
        raise ValueError(f"read_sft_file: stage must be one of {STAGES}, got {stage!r}")
    path = Path(path)
    source = _open_parquet(path, what)
    rows_in_file = source.metadata.num_rows
    sidecar = _checked_sidecar(path, stage, what, rows_in_file)
    _check_schema(path, stage, what, source.schema_arrow, sidecar.extraction.d_model)
    scan = _scan_file(path, stage, what, source, sidecar)
    if scan.bad and not skip_bad_rows:
        raise DataError(f"{what} {path}: {_bad_rows_summary(scan)}; {SKIP_HINT}")
    if scan.kept == 0:
        raise DataError(
            f"{what} {path}: all {rows_in_file} rows are bad, nothing to train on: "
            f"{_bad_rows_summary(scan)}"
        )
    return _kept_rows(scan, sidecar, rows_in_file)


def _open_parquet(path: Path, what: str) -> pq.ParquetFile:
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    try:
        source = pq.ParquetFile(path, memory_map=True)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{what} {path} is not a readable parquet file: {err}") from err
    if source.metadata.num_rows == 0:
        raise DataError(f"{what} {path} has no rows")
    return source


def _checked_sidecar(path: Path, stage: str, what: str, rows_in_file: int) -> DatasetSidecar:
    """The sidecar, which must be of `stage` and not the activation-shuffled control baseline."""
    sidecar = _read_sidecar(path, what)
    if sidecar.stage != stage:
        raise DataError(
            f"{what} {path}: its sidecar says stage {sidecar.stage!r}, expected {stage!r}"
        )
    if "activation_shuffle" in sidecar.extra:
        raise DataError(
            f"{what} {path}: its sidecar marks it as the activation-shuffled control baseline "
            "(activation_shuffle: vectors permuted across rows): not training data"
        )
    if sidecar.row_count != rows_in_file:
        log.warning(
            "%s %s: %d rows, its sidecar says row_count=%d",
            what,
            path,
            rows_in_file,
            sidecar.row_count,
        )
    return sidecar


def _read_sidecar(path: Path, what: str) -> DatasetSidecar:
    try:
        return read_dataset_sidecar(path)
    except FileNotFoundError as err:
        raise DataError(
            f"{what} {path} has no sidecar {dataset_sidecar_path(path).name}: `datagen build` "
            "writes one beside every training file (copy it along with the parquet)"
        ) from err
    except (SidecarError, OSError, UnicodeDecodeError) as err:
        raise DataError(f"{what} {path}: its sidecar cannot be used: {err}") from err


# --- the schema --------------------------------------------------------------------------------


def _columns(stage: str) -> list[str]:
    """The columns read (and required) for `stage`."""
    response = ["response"] if stage == "av_sft" else []
    return ["prompt", *response, VECTOR_COLUMN, "doc_id"]


def _check_schema(path: Path, stage: str, what: str, schema: pa.Schema, d_model: int) -> None:
    missing = [name for name in _columns(stage) if name not in schema.names]
    if missing:
        raise DataError(
            f"{what} {path} has no column {', '.join(map(repr, missing))} "
            f"(it has: {', '.join(schema.names)})"
        )
    for name in _columns(stage):
        kind = schema.field(name).type
        problem = _type_problem(stage, name, kind, d_model)
        if problem:
            raise DataError(f"{what} {path}: column {name!r} is {kind}: {problem}")


def _type_problem(stage: str, name: str, kind: pa.DataType, d_model: int) -> str | None:
    """Why a column of type `kind` cannot be used, or None."""
    if name == VECTOR_COLUMN:
        return _vector_type_problem(kind, d_model)
    if name == "prompt" and stage == "av_sft":
        return None if _is_chat(kind) else f"expected {CHAT_PROMPT_TYPE} (chat messages)"
    if _is_string(kind) or (name == "doc_id" and pa.types.is_null(kind)):
        return None
    return "expected string"


def _vector_type_problem(kind: pa.DataType, d_model: int) -> str | None:
    is_list = _is_list(kind) or pa.types.is_fixed_size_list(kind)
    if not is_list or not pa.types.is_floating(kind.value_type):
        return "expected a list of floats (fixed_size_list<float32>[d])"
    if pa.types.is_fixed_size_list(kind) and kind.list_size != d_model:
        return f"vectors have d={kind.list_size}, its sidecar says extraction.d_model={d_model}"
    return None


def _is_chat(kind: pa.DataType) -> bool:
    """list<struct<role: string, content: string>> (large variants allowed)."""
    if not _is_list(kind) or not pa.types.is_struct(kind.value_type):
        return False
    message = kind.value_type
    fields = {message.field(i).name: message.field(i).type for i in range(message.num_fields)}
    return fields.keys() == {"role", "content"} and all(map(_is_string, fields.values()))


def _is_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind)


def _is_string(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


# --- the rows ----------------------------------------------------------------------------------


def _scan_file(
    path: Path, stage: str, what: str, source: pq.ParquetFile, sidecar: DatasetSidecar
) -> _Scan:
    d_model = sidecar.extraction.d_model
    scan = _Scan(
        path=path,
        stage=stage,
        what=what,
        d_model=d_model,
        ar_suffix=_ar_suffix(stage, sidecar),
        vectors_ND=np.empty((source.metadata.num_rows, d_model), np.float32),
    )
    first_row = 0
    batches = source.iter_batches(
        batch_size=max(1, BATCH_VALUES // d_model), columns=_columns(stage)
    )
    try:
        for batch in batches:
            _scan_batch(scan, batch, first_row)
            first_row += batch.num_rows
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{what} {path}: cannot be read after row {first_row}: {err}") from err
    return scan


def _ar_suffix(stage: str, sidecar: DatasetSidecar) -> str | None:
    """The text every ar_sft prompt ends with (None: not ar_sft, or no AR template recorded)."""
    templates = sidecar.prompt_templates
    if stage != "ar_sft" or templates is None or templates.ar is None:
        return None
    return prompts.ar_suffix_text(templates.ar)


def _scan_batch(scan: _Scan, batch: pa.RecordBatch, first_row: int) -> None:
    """Check one batch: count its bad rows, keep the good ones."""
    vectors_ND, problems = _vector_problems(batch.column(VECTOR_COLUMN), scan.d_model)
    if scan.stage == "av_sft":
        problems.update(_chat_problems(batch.column("prompt")))
        responses = batch.column("response").to_pylist()
        problems.update(_response_problems(responses))
    else:
        problems.update(_ar_prompt_problems(batch.column("prompt"), scan.ar_suffix))
        responses = None
    reason_N = _first_problem(problems, batch.num_rows)
    _count_bad_rows(scan, reason_N, batch.column("doc_id"), first_row)
    _keep_rows(scan, batch, reason_N < 0, vectors_ND, responses, first_row)


def _first_problem(problems: dict[str, np.ndarray], n_rows: int) -> np.ndarray:
    """int8 [N]: the index in ROW_PROBLEMS of each row's first problem; -1 for a good row."""
    reason_N = np.full(n_rows, -1, np.int8)
    for index, name in reversed(list(enumerate(ROW_PROBLEMS))):
        if name in problems:
            reason_N[problems[name]] = index
    return reason_N


def _count_bad_rows(scan: _Scan, reason_N: np.ndarray, doc_ids: pa.Array, first_row: int) -> None:
    names = list(ROW_PROBLEMS)
    for index in np.unique(reason_N[reason_N >= 0]):
        bad_N = np.flatnonzero(reason_N == index)
        first = int(bad_N[0])
        bad = scan.bad.setdefault(names[index], _BadRows(first_row + first, doc_ids[first].as_py()))
        bad.count += bad_N.size


def _keep_rows(
    scan: _Scan,
    batch: pa.RecordBatch,
    keep_N: np.ndarray,
    vectors_ND: np.ndarray,
    responses: list[str] | None,
    first_row: int,
) -> None:
    """Append the good rows of a batch to `scan` (vectors into its preallocated array)."""
    n_keep = int(keep_N.sum())
    if n_keep == 0:
        return
    mask = None if n_keep == len(keep_N) else pa.array(keep_N)

    def kept(name: str) -> pa.Array:
        return batch.column(name) if mask is None else batch.column(name).filter(mask)

    scan.vectors_ND[scan.kept : scan.kept + n_keep] = (
        vectors_ND if mask is None else vectors_ND[keep_N]
    )
    scan.rows.append(first_row + np.flatnonzero(keep_N))
    if scan.stage == "av_sft":
        scan.prompts += _chat_lists(kept("prompt"))
        scan.responses += [r for r, keep in zip(responses, keep_N, strict=True) if keep]
    else:
        scan.prompts += kept("prompt").to_pylist()
    scan.doc_ids += [doc_id or "" for doc_id in kept("doc_id").to_pylist()]
    scan.kept += n_keep


def _kept_rows(scan: _Scan, sidecar: DatasetSidecar, rows_in_file: int) -> SFTRows:
    skipped = Counter({name: bad.count for name, bad in scan.bad.items()})
    if skipped:
        log.warning("%s %s: dropped %s", scan.what, scan.path, _counts(skipped))
    return SFTRows(
        path=scan.path,
        stage=scan.stage,
        sidecar=sidecar,
        rows_N=np.concatenate(scan.rows).astype(np.int64, copy=False),
        prompts=scan.prompts,
        responses=scan.responses if scan.stage == "av_sft" else None,
        vectors_ND=scan.vectors_ND[: scan.kept],
        doc_ids=scan.doc_ids,
        skipped=skipped,
        rows_in_file=rows_in_file,
    )


# --- row checks --------------------------------------------------------------------------------


def _vector_problems(column: pa.Array, d_model: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The batch's float32 [N, D] vectors (junk in null/ragged rows) and its vector problems."""
    null_N = column.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_fixed_size_list(column.type):
        ragged_N = np.zeros_like(null_N)
        vectors_ND = _fixed_vectors_ND(column, d_model)
    else:
        lengths_N = column.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
        ragged_N = ~null_N & (lengths_N != d_model)
        vectors_ND = _listed_vectors_ND(column, d_model, ~null_N & ~ragged_N)
    shaped_N = ~null_N & ~ragged_N
    return vectors_ND, {
        "null_vector": null_N,
        "ragged_vector": ragged_N,
        "nonfinite_vector": shaped_N & ~np.isfinite(vectors_ND).all(axis=1),
        "zero_vector": shaped_N & ~vectors_ND.any(axis=1),
    }


def _fixed_vectors_ND(column: pa.FixedSizeListArray, d_model: int) -> np.ndarray:
    """A zero-copy [N, D] view (float32, no nulls inside); a null entry inside becomes NaN."""
    values = column.values.slice(column.offset * d_model, len(column) * d_model)
    return _as_float32(values).reshape(len(column), d_model)


def _listed_vectors_ND(column: pa.Array, d_model: int, shaped_N: np.ndarray) -> np.ndarray:
    """[N, D] from a variable-size list column; only the rows in `shaped_N` have width D."""
    if shaped_N.all():
        return _as_float32(column.flatten()).reshape(len(column), d_model)
    vectors_ND = np.zeros((len(column), d_model), np.float32)
    shaped = column.filter(pa.array(shaped_N)).flatten()
    vectors_ND[shaped_N] = _as_float32(shaped).reshape(-1, d_model)
    return vectors_ND


def _as_float32(values: pa.Array) -> np.ndarray:
    return values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)


def _blank_N(strings: pa.Array) -> np.ndarray:
    """bool [N]: null or only whitespace."""
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(strings)), 0)
    return blank.fill_null(True).to_numpy(zero_copy_only=False)


def _ar_prompt_problems(column: pa.Array, suffix: str | None) -> dict[str, np.ndarray]:
    problems = {"empty_prompt": _blank_N(column)}
    if suffix is not None:
        ends_N = pc.ends_with(column, pattern=suffix).fill_null(True)
        problems["no_ar_suffix"] = ~ends_N.to_numpy(zero_copy_only=False)
    return problems


def _chat_problems(column: pa.Array) -> dict[str, np.ndarray]:
    """Empty chats, chats with a null message/role/content, and the `<INJECT>` count per row."""
    n_rows = len(column)
    lengths_N = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False)
    parent_M = np.repeat(np.arange(n_rows), lengths_N)  # flatten() skips null chats' messages
    messages = _message_fields(column.flatten())
    broken_M = _blank_N(messages["role"]) | messages["content"].is_null().to_numpy(
        zero_copy_only=False
    )
    injects_M = pc.count_substring(messages["content"], INJECT_PLACEHOLDER).fill_null(0)
    injects_N = np.bincount(parent_M, weights=injects_M.to_numpy(), minlength=n_rows)
    return {
        "empty_prompt": lengths_N == 0,
        "bad_chat_prompt": np.bincount(parent_M[broken_M], minlength=n_rows) > 0,
        "inject_count": injects_N != 1,
    }


def _message_fields(messages: pa.StructArray) -> dict[str, pa.Array]:
    """{"role": [M], "content": [M]}; a null message makes both null."""
    names = [messages.type.field(i).name for i in range(messages.type.num_fields)]
    return dict(zip(names, messages.flatten(), strict=True))


def _response_problems(responses: list[str | None]) -> dict[str, np.ndarray]:
    blank_N = np.array([r is None or not r.strip() for r in responses], dtype=bool)
    unparseable_N = np.array(
        [
            not blank and prompts.parse_explanation(r) is None
            for r, blank in zip(responses, blank_N, strict=True)
        ],
        dtype=bool,
    )
    return {"empty_response": blank_N, "unparseable_response": unparseable_N}


def _chat_lists(column: pa.Array) -> list[list[dict[str, str]]]:
    """Python chats of good rows; equal strings share one object (rows repeat one template)."""
    messages = _message_fields(column.flatten())
    role_M = _shared_strings(messages["role"])
    content_M = _shared_strings(messages["content"])
    ends_N = np.cumsum(pc.list_value_length(column).to_numpy(zero_copy_only=False))
    starts_N = np.concatenate([[0], ends_N[:-1]])
    return [
        [{"role": role_M[m], "content": content_M[m]} for m in range(start, end)]
        for start, end in zip(starts_N.tolist(), ends_N.tolist(), strict=True)
    ]


def _shared_strings(strings: pa.Array) -> list[str]:
    encoded = pc.dictionary_encode(strings)
    values = encoded.dictionary.to_pylist()
    return [values[i] for i in encoded.indices.to_numpy(zero_copy_only=False).tolist()]


# --- messages ----------------------------------------------------------------------------------


def _bad_rows_summary(scan: _Scan) -> str:
    """ "row 17 (doc_id 'doc-3'): activation_vector has NaN/inf entries (3 rows like this); ..."."""
    parts = []
    for name, bad in sorted(scan.bad.items(), key=lambda item: item[1].first_row):
        problem = ROW_PROBLEMS[name].format(d_model=scan.d_model, suffix=scan.ar_suffix)
        like = "1 row" if bad.count == 1 else f"{bad.count} rows"
        parts.append(f"row {bad.first_row}{_doc_part(bad.doc_id)}: {problem} ({like} like this)")
    return "; ".join(parts)


def _doc_part(doc_id: str | None) -> str:
    return "" if doc_id is None else f" (doc_id {doc_id!r})"


def _counts(counter: Counter) -> str:
    return ", ".join(f"{name}={count}" for name, count in sorted(counter.items()))


# --- the model ---------------------------------------------------------------------------------


def check_against_model(
    rows: SFTRows, *, d_model: int, extraction_layer: int | None, tokenizer: Any
) -> None:
    """Refuse a file made for another model: d_model vs the sidecar's extraction.d_model, the layer
    (extraction.layer_index vs extraction_layer when that is not None), the marker tokens and the AV
    template (sidecar.check_marker against the live tokenizer), and for ar_sft the AR suffix
    (sidecar.check_ar_suffix). Raise DataError saying what drifted (key, expected, found) and that
    the data and the model must come from the same base model; wrap SidecarError/SidecarDriftError
    messages rather than losing them."""
    extraction = rows.sidecar.extraction
    if d_model != extraction.d_model:
        raise _model_mismatch(
            rows,
            f"extraction.d_model drifted: expected {d_model} (the model's d_model), "
            f"found {extraction.d_model}",
        )
    if extraction_layer is not None and extraction_layer != extraction.layer_index:
        raise _model_mismatch(
            rows,
            f"extraction.layer_index drifted: expected {extraction_layer} (the model's "
            f"extraction layer), found {extraction.layer_index}",
        )
    try:
        check_marker(rows.sidecar, tokenizer)
        if rows.stage == "ar_sft":
            check_ar_suffix(rows.sidecar, tokenizer)
    except (SidecarError, PromptError) as err:
        raise _model_mismatch(rows, str(err)) from err


def _model_mismatch(rows: SFTRows, problem: str) -> DataError:
    base_model = rows.sidecar.extraction.base_model
    return DataError(
        f"{rows.path} does not fit the model: {problem}; the data and the model must come "
        f"from the same base model (this file was extracted from {base_model!r})"
    )
