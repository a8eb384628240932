"""Parquet building blocks shared by the datagen stages: schemas, atomic writers, vector checks.

- Every parquet this package writes appears only once complete: `AtomicParquetWriter` writes a
  hidden temporary file in the destination directory, fsyncs it, and `os.replace`s it into place
  on success; on any exception (or a kill) the destination is untouched and the temporary is
  removed (or, after `kill -9`, left as a dot-file that every reader ignores).
- Vectors are `fixed_size_list<float32>[d]`; `vectors_ND` turns a column into a zero-copy
  `[N, D]` numpy view, and `vector_array` goes back. Inputs with variable-size float lists are
  accepted and converted once their width is checked.
- `nonfinite_rows` finds NaN/inf rows so the stages can name them (error) or count them (skip).

Legend: N = rows, D = d_model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

VECTOR_COLUMN = "activation_vector"
TEXT_COLUMN = "detokenized_text_truncated"
PROVENANCE_COLUMNS = ("doc_id", "position", "n_raw_tokens", "activation_layer")


def vector_type(d_model: int) -> pa.DataType:
    return pa.list_(pa.float32(), d_model)


def activation_schema(d_model: int) -> pa.Schema:
    """The Extract stage's rows (NLA.md "Data"), plus `position`."""
    return pa.schema(
        [
            pa.field("n_raw_tokens", pa.int64()),
            pa.field(TEXT_COLUMN, pa.string()),
            pa.field(VECTOR_COLUMN, vector_type(d_model)),
            pa.field("activation_layer", pa.int64()),
            pa.field("doc_id", pa.string()),
            pa.field("position", pa.int64()),
        ]
    )


class AtomicParquetWriter:
    """A `pq.ParquetWriter` on a temporary file that becomes `path` only when closed cleanly."""

    def __init__(self, path: str | os.PathLike[str], schema: pa.Schema, **options: Any):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.writer = pq.ParquetWriter(self.tmp, schema, **options)
        self.rows = 0

    def write(self, table_or_batch: pa.Table | pa.RecordBatch, row_group_size: int | None = None):
        if isinstance(table_or_batch, pa.RecordBatch):
            table_or_batch = pa.Table.from_batches([table_or_batch])
        self.writer.write_table(table_or_batch, row_group_size=row_group_size)
        self.rows += table_or_batch.num_rows

    def __enter__(self) -> AtomicParquetWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.writer.close()
            if exc_type is None:
                fsync_file(self.tmp)
                os.replace(self.tmp, self.path)
        finally:
            self.tmp.unlink(missing_ok=True)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def write_json_atomically(path: Path, data: Any) -> None:
    """`data` as indented JSON at `path`, via a temporary file and `os.replace`."""
    write_text_atomically(path, json.dumps(data, indent=1, sort_keys=False) + "\n")


def write_text_atomically(path: Path, text: str) -> None:
    """`text` at `path` (UTF-8), via a fsynced temporary file and `os.replace`: a reader sees
    the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def open_parquet(path: Path, what: str) -> pq.ParquetFile:
    """`path` opened for reading; errors name the file and what it should have been."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{what} {path} is not a readable parquet file: {err}") from err


def require_columns(
    path: Path, schema: pa.Schema, columns: Sequence[str], what: str, hint: str = ""
) -> None:
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise ValueError(
            f"{what} {path} has no column {', '.join(map(repr, missing))} "
            f"(it has: {', '.join(schema.names)}){hint}"
        )


def vector_width(path: Path, schema: pa.Schema) -> int | None:
    """d of a fixed-size vector column; None for a variable-size float list (checked per row)."""
    kind = schema.field(VECTOR_COLUMN).type
    is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind)
    if pa.types.is_fixed_size_list(kind) or is_list:
        if pa.types.is_floating(kind.value_type):
            return kind.list_size if pa.types.is_fixed_size_list(kind) else None
    raise ValueError(
        f"{path}: column {VECTOR_COLUMN!r} is {kind}, expected fixed_size_list<float32>[d]"
    )


def vectors_ND(
    column: pa.Array | pa.ChunkedArray, d_model: int, where: str, first_row: int = 0
) -> np.ndarray:
    """A vector column as a float32 [N, D] array; a null or a row of another width is an error.

    `where` (the file) and `first_row` (the column's first row in it) go into error messages.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        row = first_row + int(np.flatnonzero(np.asarray(column.is_null()))[0])
        raise ValueError(f"{where}: row {row} has a null {VECTOR_COLUMN}")
    if pa.types.is_fixed_size_list(column.type):
        lengths = np.full(len(column), column.type.list_size)
    else:
        lengths = np.asarray(column.value_lengths())
    wrong = np.flatnonzero(lengths != d_model)
    if wrong.size:
        raise ValueError(
            f"{where}: row {first_row + int(wrong[0])} has a vector of length "
            f"{int(lengths[wrong[0]])}, expected d_model={d_model} ({wrong.size} such row(s))"
        )
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.astype(np.float32, copy=False).reshape(-1, d_model)


def vector_array(vec_ND: np.ndarray) -> pa.FixedSizeListArray:
    """[N, D] float32 -> fixed_size_list<float32>[D]."""
    vec_ND = np.ascontiguousarray(vec_ND, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(vec_ND.reshape(-1)), vec_ND.shape[1])


def nonfinite_rows(vec_ND: np.ndarray) -> np.ndarray:
    """Indices of rows with a NaN or an infinity."""
    return np.flatnonzero(~np.isfinite(vec_ND).all(axis=1))
