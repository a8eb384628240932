"""Parquet and sidecar I/O of the Explain stage.

- Inputs are checked up front (file, parquet, text column and its type, no explain columns yet) so
  that every bad input fails with the file and column named, before any request is paid for.
- Only the text column is read into memory; the output is written by streaming the input's record
  batches and appending three columns, so activation vectors never sit in memory all at once.
- The output parquet and its sidecar appear only once complete (temporary file, then `os.replace`).
- The sidecar is read and written as a plain YAML mapping with unknown keys kept (the project's
  sidecar module will take this over).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from nla_mcore.datagen.explainers import Answer

log = logging.getLogger(__name__)

TEXT_COLUMN = "detokenized_text_truncated"
OUTPUT_FIELDS = (
    pa.field("explanation", pa.string()),
    pa.field("explain_status", pa.string()),
    pa.field("explain_failure", pa.string()),
)
SIDECAR_SUFFIX = ".nla_meta.yaml"
WRITE_BATCH_ROWS = 4096


def read_texts(path: Path) -> list[str | None]:
    """The text column, after checking the file and its schema; errors name the file and column."""
    if not path.is_file():
        raise FileNotFoundError(f"explain input not found: {path}")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"explain input {path} is not a readable parquet file: {err}") from err
    if TEXT_COLUMN not in schema.names:
        raise ValueError(
            f"explain input {path} has no column {TEXT_COLUMN!r} (it has: {', '.join(schema.names)}); "
            "pass an activation parquet from the activations stage"
        )
    text_type = schema.field(TEXT_COLUMN).type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise ValueError(
            f"explain input {path}: column {TEXT_COLUMN!r} is {text_type}, expected string"
        )
    clashes = [f.name for f in OUTPUT_FIELDS if f.name in schema.names]
    if clashes:
        raise ValueError(
            f"explain input {path} already has {', '.join(clashes)}: pass the activation parquet, "
            "not an explained one"
        )
    return pq.read_table(path, columns=[TEXT_COLUMN]).column(0).to_pylist()


def check_output_path(input_path: Path, output_path: Path) -> None:
    if output_path.resolve() == input_path.resolve():
        raise ValueError(f"explain output {output_path} is the input file: choose another path")


def write_output(input_path: Path, output_path: Path, answers: Sequence[Answer | None]) -> None:
    """Input columns + the three explain columns, row order kept; visible only once complete."""
    source = pq.ParquetFile(input_path)
    schema = source.schema_arrow
    for f in OUTPUT_FIELDS:
        schema = schema.append(f)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(f".{output_path.name}.tmp-{os.getpid()}")
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            start = 0
            for batch in source.iter_batches(batch_size=WRITE_BATCH_ROWS):
                stop = start + batch.num_rows
                columns = batch.columns + explain_columns(answers[start:stop])
                writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=schema))
                start = stop
        os.replace(tmp, output_path)
    finally:
        tmp.unlink(missing_ok=True)


def explain_columns(answers: Sequence[Answer | None]) -> list[pa.Array]:
    missing = Answer.failed("no_answer", cacheable=False)
    answers = [a or missing for a in answers]
    return [
        pa.array([a.explanation if a.ok else None for a in answers], pa.string()),
        pa.array(["ok" if a.ok else "failed" for a in answers], pa.string()),
        pa.array([a.failure for a in answers], pa.string()),
    ]


def sidecar_path(parquet_path: Path) -> Path:
    return parquet_path.with_name(parquet_path.name + SIDECAR_SUFFIX)


def carry_sidecar(input_path: Path, output_path: Path, api_summaries: dict) -> None:
    """Copy the input's sidecar (unknown keys kept) with an `api_summaries` block; none if absent."""
    source = sidecar_path(input_path)
    if not source.exists():
        log.info("no sidecar beside %s; the output gets none", input_path)
        return
    meta = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
    if not isinstance(meta, dict):
        raise ValueError(f"sidecar {source} is not a YAML mapping")
    meta["api_summaries"] = api_summaries
    target = sidecar_path(output_path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(meta, sort_keys=False, allow_unicode=True), encoding="utf-8")
    os.replace(tmp, target)
