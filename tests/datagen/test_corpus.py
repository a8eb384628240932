"""Corpus readers: every format, stable ids, and bad inputs as counted skips or named errors."""

from __future__ import annotations

import gzip
import importlib.util
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nla_mcore.datagen.corpus import CorpusError, count_records, iter_corpus
from nla_mcore.datagen.datagen_config import CorpusConfig


def records(**settings):
    return list(iter_corpus(CorpusConfig(**settings)))


def test_txt_one_document_per_file_or_per_line(tmp_path):
    """A .txt file is one document by default (id = its path), or one per line with ids
    `path:line`; a blank line is a counted skip, not a silent gap, so record indices (which
    decide the DP rank and the shard) are a pure function of the file."""
    (tmp_path / "a.txt").write_text("first line\n\nthird line\n")
    whole = records(paths=[str(tmp_path / "a.txt")])
    assert [(r.doc_id, r.text) for r in whole] == [
        (str(tmp_path / "a.txt"), "first line\n\nthird line\n")
    ]
    lines = records(paths=[str(tmp_path / "a.txt")], txt_mode="line")
    assert [(r.doc_id.rsplit(":", 1)[1], r.text, r.skip) for r in lines] == [
        ("1", "first line", None),
        ("2", None, "empty"),
        ("3", "third line", None),
    ]


def test_jsonl_ids_from_field_or_file_and_line(tmp_path):
    """Without an id field the id is `path:line` (stable across runs and sharding); with one,
    its value. gzip is read transparently."""
    path = tmp_path / "c.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(json.dumps({"id": 7, "text": "seven"}) + "\n")
        fh.write(json.dumps({"id": "x", "text": "ex"}) + "\n")
    assert [(r.doc_id, r.text) for r in records(paths=[str(path)])] == [
        (f"{path}:1", "seven"),
        (f"{path}:2", "ex"),
    ]
    assert [r.doc_id for r in records(paths=[str(path)], id_field="id")] == ["7", "x"]


def test_parquet_columns_are_configurable(tmp_path):
    """Parquet corpora name their text and id columns; a missing column is an error that lists
    the columns the file has."""
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": ["one", None, "three"], "key": ["a", "b", "c"]}), path)
    got = records(paths=[str(path)], text_field="body", id_field="key")
    assert [(r.doc_id, r.text, r.skip) for r in got] == [
        ("a", "one", None),
        ("b", None, "empty"),
        ("c", "three", None),
    ]
    with pytest.raises(CorpusError, match=r"no column 'text' \(it has: body, key\)"):
        records(paths=[str(path)])


def test_directories_globs_slices_and_counts(tmp_path):
    """Directories are searched recursively in sorted order; start/max_docs cut a slice of
    records; count_records (the progress bar's total) agrees with what is read."""
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("b.txt", "a.txt", "sub/c.txt"):
        (tmp_path / "d" / name).write_text(name)
    (tmp_path / "d" / "ignored.bin").write_text("x")
    got = records(paths=[str(tmp_path / "d")])
    assert [r.text for r in got] == ["a.txt", "b.txt", "sub/c.txt"]
    assert [r.text for r in records(paths=[str(tmp_path / "d" / "*.txt")])] == ["a.txt", "b.txt"]
    cfg = CorpusConfig(paths=[str(tmp_path / "d")], start=1, max_docs=5)
    assert [r.text for r in iter_corpus(cfg)] == ["b.txt", "sub/c.txt"]
    assert count_records(cfg) == 2
    lines = tmp_path / "l.jsonl"
    lines.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"}')  # no final newline
    assert count_records(CorpusConfig(paths=[str(lines)])) == 3


def test_missing_files_are_errors_that_name_them(tmp_path):
    """A corpus path that does not exist, or a glob/directory with nothing to read, must stop the
    run naming it (never an empty extraction)."""
    with pytest.raises(FileNotFoundError, match="corpus file not found: .*nope.jsonl"):
        records(paths=[str(tmp_path / "nope.jsonl")])
    with pytest.raises(FileNotFoundError, match=r"glob .*\*.jsonl' matches no file"):
        records(paths=[str(tmp_path / "*.jsonl")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no file ending in"):
        records(paths=[str(tmp_path / "empty")])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(CorpusError, match="cannot tell the format from '.csv'"):
        records(paths=[str(tmp_path / "x.csv")])


def test_non_utf8_bytes_skip_replace_or_error(tmp_path):
    """One bad byte costs one document: skipped and counted (default), kept with U+FFFD and
    noted, or an error naming the file and line; the neighbouring documents are unaffected."""
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "good"}\n{"text": "bad \xff byte"}\n{"text": "fine"}\n')
    skipped = records(paths=[str(path)])
    assert [r.skip for r in skipped] == [None, "invalid_utf8", None]
    assert f"{path}:2: not valid UTF-8" in skipped[1].message
    replaced = records(paths=[str(path)], on_decode_error="replace")
    assert replaced[1].text == "bad \ufffd byte" and replaced[1].note == "utf8_replaced"
    with pytest.raises(CorpusError, match=f"{path}:2: not valid UTF-8"):
        records(paths=[str(path)], on_decode_error="error")
    text_file = tmp_path / "t.txt"
    text_file.write_bytes(b"caf\xe9")
    assert records(paths=[str(text_file)])[0].skip == "invalid_utf8"


def test_malformed_lines_are_counted_but_a_wrong_field_is_an_error(tmp_path):
    """Damaged lines (not JSON, not an object, blank, a null text) are counted skips; a line
    without the text field means the config names the wrong field, which would skip the whole
    corpus, so it is an error listing the keys present."""
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\nnot json\n[1, 2]\n\n{"text": null}\n{"text": "  "}\n')
    assert [r.skip for r in records(paths=[str(path)])] == [
        None,
        "bad_json",
        "bad_json",
        "empty",
        "empty",
        "empty",
    ]
    path.write_text('{"body": "x"}\n')
    with pytest.raises(CorpusError, match=r"c.jsonl:1: no key 'text' \(keys: body\)"):
        records(paths=[str(path)])
    path.write_text('{"text": 5}\n')
    with pytest.raises(CorpusError, match="'text' is a int, not a string"):
        records(paths=[str(path)])


@pytest.mark.skipif(
    importlib.util.find_spec("datasets") is not None, reason="datasets is installed"
)
def test_hf_source_without_datasets_says_what_to_install():
    """`datasets` is optional (not installed here): asking for format=hf must say so plainly."""
    with pytest.raises(CorpusError, match="needs the `datasets` package"):
        records(format="hf", hf_name="json")


def test_hf_source_reads_a_local_json_dataset(tmp_path):
    """With `datasets` installed, format=hf reads through load_dataset (here its json builder on
    a local file, no network); ids are `{name}/{split}:{index}`."""
    pytest.importorskip("datasets")
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "one"}\n{"text": ""}\n')
    got = records(format="hf", hf_name="json", hf_data_files=[str(path)], hf_streaming=False)
    assert [(r.doc_id, r.text, r.skip) for r in got] == [
        ("json/train:0", "one", None),
        ("json/train:1", None, "empty"),
    ]
