"""Split stage: whole documents per split, exact fractions, deterministic, streaming."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest
import yaml
from datagen_toys import documents, extract_config, make_toy, one_torch_thread, rows_of, write_jsonl

from nla_mcore.datagen.datagen_config import SplitConfig
from nla_mcore.datagen.extract import ExtractError, run_extract
from nla_mcore.datagen.split import assign_documents, run_split, split_bounds
from nla_mcore.sidecar import read_dataset_sidecar


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models, shared 2-core machine: one torch thread is faster (see one_torch_thread)."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def extraction(tmp_path_factory):
    """One finished extraction (60 documents, 2 DP ranks) shared by the tests of this module."""
    root = tmp_path_factory.mktemp("split")
    toy = make_toy("qwen2", root)
    corpus = write_jsonl(root / "c.jsonl", documents(60, seed=21))
    for rank in range(2):
        run_extract(
            extract_config([corpus]),
            toy.provider(),
            toy.tokenizer,
            out_dir=root / "x",
            dp_rank=rank,
            dp_size=2,
        )
    return root / "x"


def test_documents_never_cross_splits_and_every_row_lands_once(extraction, tmp_path):
    """Each document's rows go to exactly one split, the three files together hold every row of
    the extraction once, and the sidecars record the split and its document count."""
    summary = run_split(SplitConfig(progress=False), extraction, tmp_path / "s")
    shards = sorted(extraction.glob("activations-*.parquet"))
    all_rows = rows_of(shards)
    per_split = {name: rows_of([path]) for name, path in summary.files.items()}
    assert sum(len(r) for r in per_split.values()) == len(all_rows)
    assert set().union(*per_split.values()) == set(all_rows)
    docs = {name: {doc for doc, _ in rows} for name, rows in per_split.items()}
    assert not (docs["av_sft"] & docs["ar_sft"] or docs["av_sft"] & docs["rl"])
    assert not docs["ar_sft"] & docs["rl"]
    for name, path in summary.files.items():
        sidecar = read_dataset_sidecar(path)
        assert sidecar.row_count == pq.ParquetFile(path).metadata.num_rows == summary.rows[name]
        assert sidecar.extra["split"]["name"] == name
        assert sidecar.extra["split"]["documents"] == len(docs[name]) == summary.docs[name]
        assert "dp_rank" not in sidecar.extraction.corpus_slice


def test_fractions_are_exact_to_one_document():
    """Documents are ranked by a seeded hash and cut at the rounded cumulative fractions, so the
    sizes are exact even for a small corpus, and another seed gives another assignment."""
    doc_ids = [f"doc-{i}" for i in range(103)]
    cfg = SplitConfig(av_sft=0.3, ar_sft=0.2, rl=0.5)
    assignment = assign_documents(doc_ids, cfg)
    counts = [list(assignment.values()).count(i) for i in range(3)]
    assert counts == [31, 21, 51]  # bounds 30.9 -> 31, 51.5 -> 52, 103
    assert split_bounds(10, [0.25, 0.25, 0.5]) == [3, 5, 10]
    assert split_bounds(4, [0.0, 0.0, 1.0]) == [0, 0, 4]
    assert assign_documents(doc_ids, cfg) == assignment
    assert assign_documents(doc_ids, SplitConfig(av_sft=0.3, ar_sft=0.2, rl=0.5, seed=1)) != (
        assignment
    )


def test_split_is_deterministic(extraction, tmp_path):
    """The same extraction and seed must give byte-identical split files."""
    one = run_split(SplitConfig(progress=False), extraction, tmp_path / "a")
    two = run_split(SplitConfig(progress=False), extraction, tmp_path / "b")
    for name in one.files:
        assert pq.read_table(one.files[name]).equals(pq.read_table(two.files[name]))


def test_bad_fractions_and_unfinished_or_mixed_extractions_are_refused(extraction, tmp_path):
    """Fractions that do not sum to 1, an extraction a rank has not finished, and shards of two
    different extractions must each fail with a message saying what to fix."""
    with pytest.raises(ValueError, match="must be >= 0 and sum to 1"):
        SplitConfig(av_sft=0.5, ar_sft=0.5, rl=0.5)
    partial = tmp_path / "partial"
    shutil.copytree(extraction, partial)
    manifest = partial / "extract-manifest-dp001.json"
    manifest.write_text(manifest.read_text().replace('"complete": true', '"complete": false'))
    with pytest.raises(ExtractError, match=r"DP rank\(s\) \[1\] is not complete"):
        run_split(SplitConfig(progress=False), partial, tmp_path / "s")
    mixed = tmp_path / "mixed"
    shutil.copytree(extraction, mixed)
    sidecar_path = mixed / "activations-dp001-00000.parquet.nla_meta.yaml"
    sidecar = yaml.safe_load(sidecar_path.read_text())
    sidecar["extraction"]["layer_index"] = 1
    sidecar_path.write_text(yaml.safe_dump(sidecar))
    with pytest.raises(ValueError, match="extraction.layer_index=1"):
        run_split(SplitConfig(progress=False), mixed, tmp_path / "s")
