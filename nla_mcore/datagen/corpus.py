"""Corpus readers: text, JSONL, parquet and (optionally) Hugging Face `datasets` -> documents.

    iter_corpus(cfg) -> Iterator[CorpusRecord]      # one record per document, skipped ones included

Design decisions and trade-offs:

- **Every record counts, skipped or not.** A blank line of a JSONL file, a document with invalid
  UTF-8, a line that is not JSON: each yields a `CorpusRecord` with `skip` set (and a message with
  the file and line) instead of silently vanishing. Record indices are therefore a pure function
  of the files, which is what the data-parallel assignment (`index % dp_size`), the shard
  boundaries and `corpus.start` / `corpus.max_docs` count, and a resumed run sees the same indices.
- **Mistakes of configuration are errors, damaged data is a counted skip.** A missing file, a glob
  that matches nothing, a missing text field or column, a text that is not a string: these raise
  `CorpusError` naming the file (and line), because they would otherwise skip the whole corpus.
  A malformed line or invalid bytes in one document are skipped and counted (`on_decode_error`
  chooses skip, U+FFFD replacement, or error for bytes).
- **Stable ids.** Without `id_field`, a document's id is `{path}` (.txt, one per file) or
  `{path}:{line}` / `{path}:{row}` (1-based line, 0-based row), with the path as given in
  `corpus.paths` (or as a glob/directory expanded it). Positions are seeded by the id, so moving a
  corpus to another directory changes them; set `id_field` when that matters.
- Files are read as bytes and decoded per document, so one bad byte costs one document.
  `.gz` files are decompressed on the fly. HF `datasets` is imported only when `format: hf`.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from nla_mcore.datagen.datagen_config import CorpusConfig, CorpusFormat, OnDecodeError, TxtMode

log = logging.getLogger(__name__)

SUFFIXES = {
    CorpusFormat.txt: (".txt", ".text"),
    CorpusFormat.jsonl: (".jsonl", ".json", ".ndjson"),
    CorpusFormat.parquet: (".parquet",),
}
GLOB_CHARS = frozenset("*?[")
PARQUET_BATCH_ROWS = 1024
_MISSING = object()


class CorpusError(ValueError):
    """The corpus cannot be read as configured; the message names the file (and line)."""


@dataclass(frozen=True, slots=True)
class CorpusRecord:
    """One document: its id and text, or the reason it is skipped (with a message saying where)."""

    doc_id: str
    text: str | None
    skip: str | None = None
    note: str | None = None
    message: str = ""

    @classmethod
    def skipped(cls, doc_id: str, reason: str, message: str) -> CorpusRecord:
        return cls(doc_id=doc_id, text=None, skip=reason, message=message)


def iter_corpus(cfg: CorpusConfig) -> Iterator[CorpusRecord]:
    """Every record of the corpus slice [start, start + max_docs), in a fixed order."""
    records = iter_all_records(cfg)
    stop = None if cfg.max_docs is None else cfg.start + cfg.max_docs
    for index, record in enumerate(records):
        if stop is not None and index >= stop:
            return
        if index >= cfg.start:
            yield record


def iter_all_records(cfg: CorpusConfig) -> Iterator[CorpusRecord]:
    if cfg.format is CorpusFormat.hf:
        yield from read_hf(cfg)
        return
    for path in resolve_files(cfg):
        fmt = file_format(path, cfg.format)
        if fmt is CorpusFormat.txt and cfg.txt_mode is TxtMode.file:
            yield read_txt_file(path, cfg)
        elif fmt is CorpusFormat.txt:
            yield from read_txt_lines(path, cfg)
        elif fmt is CorpusFormat.jsonl:
            yield from read_jsonl(path, cfg)
        else:
            yield from read_parquet(path, cfg)


def describe_corpus(cfg: CorpusConfig) -> dict[str, Any]:
    """What the sidecar records as `extraction.corpus`."""
    if cfg.format is CorpusFormat.hf:
        return {
            "hf_name": cfg.hf_name,
            "hf_config": cfg.hf_config,
            "hf_split": cfg.hf_split,
            "text_field": cfg.text_field,
        }
    return {"paths": list(cfg.paths), "format": cfg.format.value, "text_field": cfg.text_field}


# --- files -------------------------------------------------------------------------------------


def resolve_files(cfg: CorpusConfig) -> list[Path]:
    """The corpus files in reading order; a path, glob or directory that yields none is an error."""
    files: list[Path] = []
    for spec in cfg.paths:
        if GLOB_CHARS & set(spec):
            matches = [Path(p) for p in sorted(glob.glob(spec, recursive=True))]
            matches = [p for p in matches if p.is_file()]
            if not matches:
                raise FileNotFoundError(f"corpus glob {spec!r} matches no file")
            files.extend(matches)
        elif Path(spec).is_dir():
            files.extend(files_in_directory(Path(spec), cfg.format))
        elif Path(spec).is_file():
            files.append(Path(spec))
        else:
            raise FileNotFoundError(f"corpus file not found: {spec}")
    return files


def files_in_directory(directory: Path, fmt: CorpusFormat) -> list[Path]:
    suffixes = SUFFIXES.get(fmt) or tuple(s for group in SUFFIXES.values() for s in group)
    found = [
        p
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.name.startswith(".") and logical_suffix(p) in suffixes
    ]
    if not found:
        raise FileNotFoundError(
            f"corpus directory {directory} holds no file ending in {', '.join(suffixes)} (or .gz)"
        )
    return found


def logical_suffix(path: Path) -> str:
    """`.jsonl` for both `a.jsonl` and `a.jsonl.gz`."""
    suffixes = path.suffixes
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1].lower() if suffixes else ""


def file_format(path: Path, fmt: CorpusFormat) -> CorpusFormat:
    if fmt is not CorpusFormat.auto:
        return fmt
    suffix = logical_suffix(path)
    for candidate, suffixes in SUFFIXES.items():
        if suffix in suffixes:
            return candidate
    raise CorpusError(
        f"corpus file {path}: cannot tell the format from {suffix or 'no extension'!r}; "
        "set extract.corpus.format to txt, jsonl or parquet"
    )


def open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


# --- text ---------------------------------------------------------------------------------------


def decode_document(
    raw: bytes | str | None, doc_id: str, where: str, policy: OnDecodeError
) -> CorpusRecord:
    """A record for `raw`: its text, or a skip/replacement for bytes (or surrogates) not UTF-8."""
    if raw is None:
        return text_record(doc_id, None, where)
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        text.encode("utf-8")  # a str from JSON can hold lone surrogates that no tokenizer takes
    except UnicodeError as err:
        message = f"{where}: not valid UTF-8 ({err.reason} at offset {err.start})"
        if policy is OnDecodeError.error:
            raise CorpusError(
                f"{message}; set extract.corpus.on_decode_error=skip or replace"
            ) from err
        if policy is OnDecodeError.skip:
            return CorpusRecord.skipped(doc_id, "invalid_utf8", message + " (skipped)")
        data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
        text = data.decode("utf-8", "replace")
        return CorpusRecord(doc_id=doc_id, text=text, note="utf8_replaced", message=message)
    return text_record(doc_id, text, where)


def text_record(doc_id: str, text: str | None, where: str) -> CorpusRecord:
    if text is None or not text.strip():
        return CorpusRecord.skipped(doc_id, "empty", f"{where}: empty document (skipped)")
    return CorpusRecord(doc_id=doc_id, text=text)


def read_txt_file(path: Path, cfg: CorpusConfig) -> CorpusRecord:
    with open_binary(path) as fh:
        raw = fh.read()
    return decode_document(raw, str(path), str(path), cfg.on_decode_error)


def read_txt_lines(path: Path, cfg: CorpusConfig) -> Iterator[CorpusRecord]:
    with open_binary(path) as fh:
        for line_no, raw in enumerate(fh, start=1):
            where = f"{path}:{line_no}"
            yield decode_document(raw.rstrip(b"\r\n"), where, where, cfg.on_decode_error)


# --- JSONL --------------------------------------------------------------------------------------


def read_jsonl(path: Path, cfg: CorpusConfig) -> Iterator[CorpusRecord]:
    with open_binary(path) as fh:
        for line_no, raw in enumerate(fh, start=1):
            where = f"{path}:{line_no}"
            if not raw.strip():
                yield CorpusRecord.skipped(where, "empty", f"{where}: blank line (skipped)")
                continue
            yield jsonl_record(raw, where, cfg)


def jsonl_record(raw: bytes, where: str, cfg: CorpusConfig) -> CorpusRecord:
    line = decode_document(raw, where, where, cfg.on_decode_error)
    if line.skip == "invalid_utf8":
        return line
    try:
        obj = json.loads(line.text or "")
    except json.JSONDecodeError as err:
        return CorpusRecord.skipped(where, "bad_json", f"{where}: not JSON ({err.msg}) (skipped)")
    if not isinstance(obj, dict):
        return CorpusRecord.skipped(
            where, "bad_json", f"{where}: a JSON {type(obj).__name__}, not an object (skipped)"
        )
    doc_id = document_id(obj, cfg.id_field, where, where)
    text = obj.get(cfg.text_field, _MISSING)
    if text is _MISSING:
        raise CorpusError(
            f"{where}: no key {cfg.text_field!r} (keys: {', '.join(map(str, obj)) or 'none'}); "
            "set extract.corpus.text_field"
        )
    if text is not None and not isinstance(text, str):
        raise CorpusError(f"{where}: {cfg.text_field!r} is a {type(text).__name__}, not a string")
    record = decode_document(text, doc_id, where, cfg.on_decode_error)
    if line.note and record.text is not None:  # the line's bytes were replaced before parsing
        record = replace(record, note=line.note, message=line.message)
    return record


def document_id(obj: dict[str, Any], id_field: str | None, default: str, where: str) -> str:
    if id_field is None:
        return default
    value = obj.get(id_field)
    if value is None or value == "":
        raise CorpusError(f"{where}: no value for the id field {id_field!r}")
    return str(value)


# --- parquet ------------------------------------------------------------------------------------


def read_parquet(path: Path, cfg: CorpusConfig) -> Iterator[CorpusRecord]:
    try:
        source = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise CorpusError(f"corpus file {path} is not a readable parquet file: {err}") from err
    columns = [cfg.text_field] + ([cfg.id_field] if cfg.id_field else [])
    missing = [c for c in columns if c not in source.schema_arrow.names]
    if missing:
        raise CorpusError(
            f"corpus file {path} has no column {', '.join(map(repr, missing))} (it has: "
            f"{', '.join(source.schema_arrow.names)}); set extract.corpus.text_field / id_field"
        )
    check_text_column_type(path, source.schema_arrow.field(cfg.text_field))
    row = 0
    for batch in source.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
        texts = batch.column(0).to_pylist()
        ids = batch.column(1).to_pylist() if cfg.id_field else [None] * len(texts)
        for text, doc_id in zip(texts, ids, strict=True):
            where = f"{path}:row {row}"
            obj = {cfg.id_field: doc_id} if cfg.id_field else {}
            doc = document_id(obj, cfg.id_field, f"{path}:{row}", where)
            yield decode_document(text, doc, where, cfg.on_decode_error)
            row += 1


def check_text_column_type(path: Path, text_field: pa.Field) -> None:
    kind = text_field.type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_binary(kind)):
        raise CorpusError(
            f"corpus file {path}: column {text_field.name!r} is {kind}, expected string"
        )


def is_binary(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


# --- Hugging Face datasets ----------------------------------------------------------------------


def read_hf(cfg: CorpusConfig) -> Iterator[CorpusRecord]:
    """Records of a `datasets.load_dataset(...)` split; `datasets` is imported only here."""
    try:
        import datasets
    except ImportError as err:
        raise CorpusError(
            "extract.corpus.format=hf needs the `datasets` package (pip install datasets), "
            "or convert the corpus to jsonl/parquet files"
        ) from err
    dataset = datasets.load_dataset(
        cfg.hf_name,
        cfg.hf_config,
        split=cfg.hf_split,
        data_files=list(cfg.hf_data_files) or None,
        streaming=cfg.hf_streaming,
    )
    name = "/".join(p for p in (cfg.hf_name, cfg.hf_config, cfg.hf_split) if p)
    for index, example in enumerate(dataset):
        where = f"{name}:{index}"
        if cfg.text_field not in example:
            raise CorpusError(
                f"{where}: no column {cfg.text_field!r} (columns: {', '.join(example)}); "
                "set extract.corpus.text_field"
            )
        doc_id = document_id(example, cfg.id_field, where, where)
        yield decode_document(example[cfg.text_field], doc_id, where, cfg.on_decode_error)


# --- counting (for progress bars) ---------------------------------------------------------------


def count_records(cfg: CorpusConfig) -> int | None:
    """Records in the corpus slice, cheaply where possible (parquet metadata, line counts)."""
    if cfg.format is CorpusFormat.hf:
        return cfg.max_docs
    total = 0
    for path in resolve_files(cfg):
        fmt = file_format(path, cfg.format)
        if fmt is CorpusFormat.txt and cfg.txt_mode is TxtMode.file:
            total += 1
        elif fmt is CorpusFormat.parquet:
            total += pq.ParquetFile(path).metadata.num_rows
        else:
            total += count_lines(path)
        if cfg.max_docs is not None and total >= cfg.start + cfg.max_docs:
            return cfg.max_docs
    return max(0, total - cfg.start)


def count_lines(path: Path) -> int:
    """Lines as `for line in file` yields them (a last line without a newline counts)."""
    lines, last = 0, b"\n"
    with open_binary(path) as fh:
        while chunk := fh.read(1 << 20):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")
