"""Split stage: a finished extraction -> av_sft / ar_sft / rl activation parquets, by document.

    run_split(cfg, extract_dir, out_dir) -> SplitSummary

1. `collect_extract` checks that every DP rank finished; every shard's sidecar must agree on the
   base model, d_model, layer, positions per document and corpus, and its schema must be the
   activation schema (errors name the shard).
2. Pass 1 reads only the `doc_id` column of every shard. Documents are ranked by
   `sha256(f"{seed}|split|{doc_id}")` and cut at the cumulative fractions (rounded), so a document
   never crosses splits and the split sizes are exact to one document.
3. Pass 2 streams each shard's record batches and appends each row to its split's writer; the
   three files (`{out_dir}/{split}.parquet`) appear atomically, each with one merged sidecar
   (stage `base`, `extra.split` = name, fractions, seed, document count).

Trade-offs: the assignment is by rank, not by a fixed hash threshold, so fractions are exact on
small corpora; the price is that adding documents to a corpus can move existing documents
between splits (re-split from scratch; never mix splits of two extractions). Memory holds the
document ids only; the vectors are streamed. Rows keep the shards' order, (rank, shard, row), so
the files of runs with different `dp_size` hold the same rows in another order.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from nla_mcore.datagen.datagen_config import SplitConfig
from nla_mcore.datagen.extract import collect_extract
from nla_mcore.datagen.parquet_io import AtomicParquetWriter, activation_schema
from nla_mcore.sidecar import (
    DatasetSidecar,
    Provenance,
    read_dataset_sidecar,
    write_dataset_sidecar,
)

log = logging.getLogger(__name__)

BATCH_ROWS = 4096
AGREEING_FIELDS = ("base_model", "d_model", "layer_index", "positions_per_doc", "corpus")


@dataclass(slots=True)
class SplitSummary:
    """Files written and what each holds."""

    out_dir: str
    files: dict[str, str] = field(default_factory=dict)
    docs: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def format(self) -> str:
        lines = [f"split summary: {self.out_dir} ({self.seconds:.1f} s)"]
        for name, path in self.files.items():
            lines.append(f"  {name}: {self.docs[name]} documents, {self.rows[name]} rows -> {path}")
        return "\n".join(lines)


def run_split(cfg: SplitConfig, extract_dir: str | Path, out_dir: str | Path) -> SplitSummary:
    """Split the extraction in `extract_dir` into `{out_dir}/{av_sft,ar_sft,rl}.parquet`."""
    started = time.monotonic()
    extract_dir, out_dir = Path(extract_dir), Path(out_dir)
    shards = [Path(p) for p in collect_extract(extract_dir).shards]
    base = checked_base_sidecar(shards, extract_dir)
    doc_ids = unique_doc_ids(shards)
    assignment = assign_documents(doc_ids, cfg)
    names = list(cfg.fractions())
    summary = SplitSummary(out_dir=str(out_dir))
    summary.files = {name: str(out_dir / f"{name}.parquet") for name in names}
    summary.docs = {name: 0 for name in names}
    for split_index in assignment.values():
        summary.docs[names[split_index]] += 1
    summary.rows = write_splits(cfg, shards, assignment, summary.files, base.extraction.d_model)
    for name in names:
        sidecar = split_sidecar(
            base, cfg, name, summary.rows[name], summary.docs[name], extract_dir
        )
        write_dataset_sidecar(summary.files[name], sidecar)
    summary.seconds = time.monotonic() - started
    log.info(summary.format())
    return summary


def checked_base_sidecar(shards: list[Path], extract_dir: Path) -> DatasetSidecar:
    """The shards' common sidecar; shards that disagree or have another schema are an error."""
    if not shards:
        raise ValueError(f"the extraction in {extract_dir} has no shard: nothing to split")
    first = read_dataset_sidecar(shards[0])
    expected_schema = activation_schema(first.extraction.d_model)
    for shard in shards:
        sidecar = read_dataset_sidecar(shard)
        for key in AGREEING_FIELDS:
            mine, theirs = getattr(sidecar.extraction, key), getattr(first.extraction, key)
            if mine != theirs:
                raise ValueError(
                    f"shard {shard} has extraction.{key}={mine!r}, shard {shards[0]} has "
                    f"{theirs!r}: shards of different extractions cannot be split together"
                )
        schema = pq.read_schema(shard).remove_metadata()
        if not schema.equals(expected_schema):
            raise ValueError(
                f"shard {shard} has schema {schema}, expected the activation schema "
                f"with d={first.extraction.d_model}"
            )
    return first


def unique_doc_ids(shards: list[Path]) -> list[str]:
    seen: dict[str, None] = {}
    for shard in shards:
        for doc_id in pq.read_table(shard, columns=["doc_id"]).column(0).to_pylist():
            seen[doc_id] = None
    return list(seen)


def split_key(seed: int, doc_id: str) -> str:
    return hashlib.sha256(f"{seed}|split|{doc_id}".encode()).hexdigest()


def assign_documents(doc_ids: list[str], cfg: SplitConfig) -> dict[str, int]:
    """{doc_id: split index}: documents ranked by their seeded hash, cut at the fractions."""
    ranked = sorted(doc_ids, key=lambda d: split_key(cfg.seed, d))
    bounds = split_bounds(len(ranked), list(cfg.fractions().values()))
    assignment = {}
    for split_index, (start, stop) in enumerate(zip([0, *bounds], bounds, strict=False)):
        for doc_id in ranked[start:stop]:
            assignment[doc_id] = split_index
    return assignment


def split_bounds(n_docs: int, fractions: list[float]) -> list[int]:
    """End index of each split in the ranking (cumulative fractions, rounded half up)."""
    bounds, total = [], 0.0
    for fraction in fractions:
        total += fraction
        bounds.append(min(n_docs, math.floor(total * n_docs + 0.5)))
    bounds[-1] = n_docs
    return bounds


def write_splits(
    cfg: SplitConfig,
    shards: list[Path],
    assignment: dict[str, int],
    paths: dict[str, str],
    d_model: int,
) -> dict[str, int]:
    """Stream every shard's rows into the split files; returns rows per split."""
    schema = activation_schema(d_model)
    total = sum(pq.ParquetFile(s).metadata.num_rows for s in shards)
    bar = tqdm(total=total, unit="row", desc="split", disable=not cfg.progress, dynamic_ncols=True)
    with bar, ExitStack() as stack:
        writers = [stack.enter_context(AtomicParquetWriter(p, schema)) for p in paths.values()]
        for shard in shards:
            for batch in pq.ParquetFile(shard).iter_batches(batch_size=BATCH_ROWS):
                route_batch(batch, assignment, writers)
                bar.update(batch.num_rows)
    return {name: writer.rows for name, writer in zip(paths, writers, strict=True)}


def route_batch(
    batch: pa.RecordBatch, assignment: dict[str, int], writers: list[AtomicParquetWriter]
) -> None:
    split_of_row = np.fromiter(
        (assignment[d] for d in batch.column("doc_id").to_pylist()), np.int64, batch.num_rows
    )
    for split_index, writer in enumerate(writers):
        mask = split_of_row == split_index
        if mask.any():
            writer.write(batch.filter(pa.array(mask)))


def split_sidecar(
    base: DatasetSidecar,
    cfg: SplitConfig,
    name: str,
    rows: int,
    docs: int,
    extract_dir: Path,
) -> DatasetSidecar:
    extraction = base.extraction
    corpus_slice = dict(extraction.corpus_slice or {})
    for rank_key in ("dp_rank", "rank_docs"):
        corpus_slice.pop(rank_key, None)
    return DatasetSidecar(
        stage="base",
        row_count=rows,
        extraction=type(extraction)(
            base_model=extraction.base_model,
            d_model=extraction.d_model,
            layer_index=extraction.layer_index,
            norm=extraction.norm,
            corpus=extraction.corpus,
            corpus_slice=corpus_slice,
            positions_per_doc=extraction.positions_per_doc,
            extra=dict(extraction.extra),
        ),
        tokens=base.tokens,
        prompt_templates=base.prompt_templates,
        parent_datasets=[str(extract_dir)],
        provenance=Provenance.current(),
        extra={
            "split": {
                "name": name,
                "fractions": cfg.fractions(),
                "seed": cfg.seed,
                "documents": docs,
            }
        },
    )
