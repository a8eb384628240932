"""Extract stage: corpus -> positions -> vectors of decoder block K -> sharded parquet.

    run_extract(cfg, provider, tokenizer, *, out_dir, dp_rank=0, dp_size=1, is_writer=True,
                agree_on_resume=None) -> ExtractSummary

1. Corpus records (corpus.py) are numbered in a fixed order; record i belongs to DP rank
   `i % dp_size`. A rank's records are cut into chunks of D = rows_per_shard // positions_per_doc;
   chunk k becomes shard `activations-dp{r:03d}-{k:05d}.parquet` (extract_io.py).
2. Each document is tokenised with its BOS and gets up to N positions (positions.py).
3. The chunk's documents are sorted by length (longest first, ties by corpus order) and cut into
   batches of at most `batch_docs` documents and `batch_tokens` padded tokens; the provider
   runs each batch to block K. The batch order is a pure function of the chunk, so every rank of a
   model-parallel group, reading the same corpus, makes the same calls in the same order.
4. The writer rank puts the rows back in corpus order, checks the vectors (shape, finiteness),
   writes the shard atomically in row groups, its sidecar, then the manifest.

Resume: shards listed in the rank's manifest are passed over (their records are read, not
tokenised) and the run continues with the first missing one; contents depend only on the data
and the settings, so a killed-and-resumed run ends with the same files as an uninterrupted one.
With model parallelism, the ranks of a group must agree on where to resume: pass
`agree_on_resume`, a function that takes this rank's count of done shards and returns the
writer's (e.g. a broadcast over the model-parallel group), so a writer that finishes a shard
while another rank is still starting cannot split the group.

Memory: one chunk's vectors (<= rows_per_shard x d x 4 bytes) and texts at a time.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from nla_mcore.datagen.corpus import CorpusRecord, count_records, iter_corpus
from nla_mcore.datagen.datagen_config import ExtractConfig, OnNonFinite, require_extract_fields
from nla_mcore.datagen.extract_io import (
    ExtractError,
    ExtractManifest,
    ShardStats,
    base_tokens,
    fingerprint,
    read_manifests,
    remove_stale_temporaries,
    shard_name,
    shard_sidecar,
    start_manifest,
)
from nla_mcore.datagen.parquet_io import (
    AtomicParquetWriter,
    activation_schema,
    nonfinite_rows,
    vector_array,
)
from nla_mcore.datagen.positions import (
    PlannedDoc,
    TokenizerInfo,
    plan_document,
    truncated_text,
)
from nla_mcore.datagen.providers import ActivationProvider, HFActivationProvider
from nla_mcore.sidecar import Tokens, write_dataset_sidecar

__all__ = [
    "ActivationProvider",
    "ExtractError",
    "ExtractSummary",
    "HFActivationProvider",
    "collect_extract",
    "length_sorted_batches",
    "run_extract",
]

log = logging.getLogger(__name__)

SKIP_WARNINGS_PER_REASON = 5


@dataclass(slots=True)
class ExtractSummary:
    """What an extraction holds (one rank, or all ranks for `collect_extract`)."""

    out_dir: str
    shards: list[str]
    stats: ShardStats
    complete: bool
    seconds: float = 0.0
    docs_this_call: int = 0
    """Documents read and run through the model by this call (not resumed over)."""

    def format(self) -> str:
        s = self.stats
        skipped = _reasons(s.skipped_docs)
        rate = ""
        if self.seconds > 0 and self.docs_this_call:
            rate = f", {self.docs_this_call / self.seconds:.1f} docs/s in this call"
        return "\n".join(
            [
                f"extract summary: {self.out_dir} ({len(self.shards)} shard(s), "
                f"{'complete' if self.complete else 'INCOMPLETE'})",
                f"  documents {s.docs_read}: used {s.docs_used}, skipped "
                f"{sum(s.skipped_docs.values())} ({skipped})",
                f"  rows {s.rows} (dropped: {_reasons(s.dropped_rows)}); notes: {_reasons(s.notes)}",
                f"  tokens: in documents {s.tokens_in_docs:,}, through the model "
                f"{s.tokens_forwarded:,}; {self.seconds:.1f} s{rate}",
            ]
        )


def _reasons(counts: Counter) -> str:
    return ", ".join(f"{r}={n}" for r, n in sorted(counts.items())) or "none"


@dataclass(slots=True)
class _Run:
    """What every chunk of one run needs."""

    cfg: ExtractConfig
    provider: ActivationProvider
    tokenizer: Any
    info: TokenizerInfo
    layer: int
    is_writer: bool
    skip_log: Counter = field(default_factory=Counter)


def run_extract(
    cfg: ExtractConfig,
    provider: ActivationProvider,
    tokenizer: Any,
    *,
    out_dir: str | Path,
    dp_rank: int = 0,
    dp_size: int = 1,
    is_writer: bool = True,
    agree_on_resume: Callable[[int], int] | None = None,
) -> ExtractSummary:
    """Extract this DP rank's share of the corpus into `out_dir` (resuming if it was started)."""
    started = time.monotonic()
    require_extract_fields(cfg)
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} is outside dp_size={dp_size}")
    out_dir = Path(out_dir)
    layer = checked_layer(cfg, provider)
    prints = fingerprint(
        cfg, layer=layer, d_model=provider.d_model, tokenizer=tokenizer, dp_size=dp_size
    )
    manifest = start_manifest(out_dir, dp_rank, dp_size, cfg.docs_per_shard, prints)
    n_done = len(manifest.shards)
    if agree_on_resume is not None:
        n_done = agree_on_resume(n_done)
        if is_writer and n_done != len(manifest.shards):
            raise ExtractError(
                f"agree_on_resume gave {n_done} done shards to a writer whose manifest lists "
                f"{len(manifest.shards)}: it must return the writer's own count"
            )
    run = _Run(cfg, provider, tokenizer, TokenizerInfo.from_tokenizer(tokenizer), layer, is_writer)
    tokens = None
    if is_writer:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_dir, dp_rank)
        tokens = base_tokens(tokenizer)
    bar = progress_bar(cfg, dp_rank, dp_size, enabled=cfg.progress and is_writer)
    rows, docs_this_call = manifest.stats().rows, 0
    try:
        chunks = rank_chunks(iter_corpus(cfg.corpus), dp_rank, dp_size, cfg.docs_per_shard)
        for index, chunk in enumerate(chunks):
            if index >= n_done:
                table, stats = extract_chunk(run, chunk, index)
                rows += stats.rows
                docs_this_call += stats.docs_read
                if is_writer:
                    write_shard(run, out_dir, manifest, index, table, stats, tokens)
            bar.update(len(chunk))
            bar.set_postfix(rows=rows, refresh=False)
    finally:
        bar.close()
    if is_writer:
        manifest.complete = True
        manifest.save(out_dir)
    summary = summary_of([manifest], out_dir, started)
    summary.docs_this_call = docs_this_call
    if is_writer:
        log.info(summary.format())
    return summary


def checked_layer(cfg: ExtractConfig, provider: ActivationProvider) -> int:
    """K: the provider's layer, which must be the configured one when one is configured."""
    if cfg.layer is not None and cfg.layer != provider.layer:
        raise ExtractError(
            f"extract.layer={cfg.layer} but the activation provider reads layer {provider.layer}: "
            "build the provider with the configured layer"
        )
    return provider.layer


def rank_chunks(
    records: Iterable[CorpusRecord], dp_rank: int, dp_size: int, docs_per_chunk: int
) -> Iterator[list[tuple[int, CorpusRecord]]]:
    """This rank's records (every dp_size-th), numbered rank-locally, in chunks of a fixed size."""
    mine = itertools.islice(records, dp_rank, None, dp_size)
    numbered = enumerate(mine)
    while chunk := list(itertools.islice(numbered, docs_per_chunk)):
        yield chunk


# --- one chunk ---------------------------------------------------------------------------------


def extract_chunk(
    run: _Run, chunk: list[tuple[int, CorpusRecord]], shard_index: int
) -> tuple[pa.Table | None, ShardStats]:
    """The chunk's rows (None on a rank that does not write) and its counts."""
    stats = ShardStats(docs_read=len(chunk))
    planned = plan_chunk(run, chunk, stats)
    vectors = activations_of(run, planned, stats)
    if not run.is_writer:
        return None, stats
    return rows_table(run, planned, vectors, stats, shard_index), stats


def plan_chunk(
    run: _Run, chunk: list[tuple[int, CorpusRecord]], stats: ShardStats
) -> list[PlannedDoc]:
    planned = []
    for index, record in chunk:
        if record.skip is not None:
            note_skip(run, stats, record.skip, record.message)
            continue
        if record.note is not None:
            stats.notes[record.note] += 1
            warn_once_per(run, record.note, f"{record.message} (kept with U+FFFD)")
        plan = plan_document(index, record.doc_id, record.text, run.tokenizer, run.info, run.cfg)
        if isinstance(plan, str):
            note_skip(run, stats, plan, too_short_message(run, record.doc_id))
            continue
        stats.docs_used += 1
        stats.tokens_in_docs += plan.n_tokens
        planned.append(plan)
    return planned


def too_short_message(run: _Run, doc_id: str) -> str:
    return (
        f"{doc_id}: no token at index >= {run.cfg.min_position} that is not special "
        "(document too short; skipped)"
    )


def note_skip(run: _Run, stats: ShardStats, reason: str, message: str) -> None:
    stats.skipped_docs[reason] += 1
    warn_once_per(run, reason, message)


def warn_once_per(run: _Run, reason: str, message: str) -> None:
    """Log the first few messages of each reason; the summary has the counts."""
    run.skip_log[reason] += 1
    if run.is_writer and run.skip_log[reason] <= SKIP_WARNINGS_PER_REASON:
        last = run.skip_log[reason] == SKIP_WARNINGS_PER_REASON
        suffix = " (further ones are only counted)" if last else ""
        log.warning("%s%s", message, suffix)


def length_sorted_batches(
    docs: list[PlannedDoc], batch_tokens: int, batch_docs: int
) -> list[list[PlannedDoc]]:
    """Longest first; a batch grows while (documents x longest) <= batch_tokens and <= batch_docs."""
    ordered = sorted(docs, key=lambda d: (-len(d.token_ids), d.index))
    batches: list[list[PlannedDoc]] = []
    for doc in ordered:
        current = batches[-1] if batches else None
        if (
            current is None
            or len(current) >= batch_docs
            or (len(current) + 1) * len(current[0].token_ids) > batch_tokens
        ):
            batches.append([doc])
        else:
            current.append(doc)
    return batches


def activations_of(
    run: _Run, planned: list[PlannedDoc], stats: ShardStats
) -> dict[int, np.ndarray]:
    """{document index: [P, D] float32} from the provider, batch by batch."""
    vectors: dict[int, np.ndarray] = {}
    for batch in length_sorted_batches(planned, run.cfg.batch_tokens, run.cfg.batch_docs):
        token_ids = [doc.token_ids for doc in batch]
        positions = [doc.positions for doc in batch]
        stats.tokens_forwarded += sum(len(ids) for ids in token_ids)
        outputs = run.provider.activations(token_ids, positions)
        vectors.update(checked_outputs(batch, outputs, run.provider.d_model))
    return vectors


def checked_outputs(
    batch: list[PlannedDoc], outputs: list[np.ndarray], d_model: int
) -> dict[int, np.ndarray]:
    if len(outputs) != len(batch):
        raise ExtractError(
            f"the activation provider returned {len(outputs)} arrays for {len(batch)} documents "
            f"(first document {batch[0].doc_id!r})"
        )
    checked = {}
    for doc, vec_PD in zip(batch, outputs, strict=True):
        vec_PD = np.asarray(vec_PD, dtype=np.float32)
        if vec_PD.shape != (len(doc.positions), d_model):
            raise ExtractError(
                f"the activation provider returned shape {vec_PD.shape} for document "
                f"{doc.doc_id!r}, expected ({len(doc.positions)}, {d_model})"
            )
        checked[doc.index] = vec_PD
    return checked


def rows_table(
    run: _Run,
    planned: list[PlannedDoc],
    vectors: dict[int, np.ndarray],
    stats: ShardStats,
    shard_index: int,
) -> pa.Table:
    """The chunk's rows in corpus order (documents by index, positions ascending)."""
    columns: dict[str, list] = {name: [] for name in activation_schema(1).names}
    kept_vectors = []
    for doc in sorted(planned, key=lambda d: d.index):
        vec_PD = vectors[doc.index]
        bad = set(nonfinite_rows(vec_PD).tolist())
        for row, position in enumerate(doc.positions):
            if row in bad:
                handle_nonfinite(run, stats, doc, position, shard_index)
                continue
            columns["n_raw_tokens"].append(position + 1)
            columns["detokenized_text_truncated"].append(
                truncated_text(run.tokenizer, doc, position, run.info)
            )
            columns["activation_layer"].append(run.layer)
            columns["doc_id"].append(doc.doc_id)
            columns["position"].append(position)
            kept_vectors.append(vec_PD[row])
    stats.rows = len(kept_vectors)
    vec_ND = np.stack(kept_vectors) if kept_vectors else np.zeros((0, run.provider.d_model))
    columns["activation_vector"] = vector_array(vec_ND)
    return pa.table(columns, schema=activation_schema(run.provider.d_model))


def handle_nonfinite(
    run: _Run, stats: ShardStats, doc: PlannedDoc, position: int, shard_index: int
) -> None:
    where = f"document {doc.doc_id!r} position {position} (shard {shard_index})"
    if run.cfg.on_nonfinite is OnNonFinite.error:
        raise ExtractError(
            f"the model produced a NaN/inf vector for {where}: check the dtype (fp16 overflows "
            "Gemma's residual stream) or set extract.on_nonfinite=skip"
        )
    stats.dropped_rows["nonfinite_vector"] += 1
    warn_once_per(run, "nonfinite_vector", f"NaN/inf vector for {where} (row dropped)")


# --- files -------------------------------------------------------------------------------------


def write_shard(
    run: _Run,
    out_dir: Path,
    manifest: ExtractManifest,
    index: int,
    table: pa.Table,
    stats: ShardStats,
    tokens: Tokens | None,
) -> None:
    """Shard parquet, then its sidecar, then the manifest that makes it count as done."""
    name = shard_name(manifest.dp_rank, index)
    with AtomicParquetWriter(out_dir / name, table.schema) as writer:
        writer.write(table, row_group_size=run.cfg.row_group_rows)
    first = index * manifest.docs_per_shard
    corpus_slice = {
        "start": run.cfg.corpus.start,
        "max_docs": run.cfg.corpus.max_docs,
        "dp_rank": manifest.dp_rank,
        "dp_size": manifest.dp_size,
        "rank_docs": [first, first + stats.docs_read],
    }
    sidecar = shard_sidecar(
        run.cfg,
        rows=table.num_rows,
        layer=run.layer,
        d_model=run.provider.d_model,
        tokens=tokens,
        corpus_slice=corpus_slice,
    )
    write_dataset_sidecar(out_dir / name, sidecar)
    manifest.shards.append({"index": index, "file": name, "stats": stats.to_json()})
    manifest.save(out_dir)


def progress_bar(cfg: ExtractConfig, dp_rank: int, dp_size: int, *, enabled: bool) -> tqdm:
    total = None
    if enabled:
        records = count_records(cfg.corpus)
        total = None if records is None else max(0, math.ceil((records - dp_rank) / dp_size))
    return tqdm(
        total=total,
        unit="doc",
        desc=f"extract dp{dp_rank}",
        disable=not enabled,
        dynamic_ncols=True,
    )


def summary_of(
    manifests: list[ExtractManifest], out_dir: Path, started: float | None = None
) -> ExtractSummary:
    stats = ShardStats()
    shards = []
    for manifest in sorted(manifests, key=lambda m: m.dp_rank):
        stats.add(manifest.stats())
        shards.extend(str(out_dir / s["file"]) for s in manifest.shards)
    return ExtractSummary(
        out_dir=str(out_dir),
        shards=shards,
        stats=stats,
        complete=all(m.complete for m in manifests),
        seconds=0.0 if started is None else time.monotonic() - started,
    )


def collect_extract(out_dir: str | Path) -> ExtractSummary:
    """The finished extraction in `out_dir`, every rank's shards in (rank, shard) order.

    Raises unless every DP rank's manifest is present and complete.
    """
    out_dir = Path(out_dir)
    return summary_of(read_manifests(out_dir), out_dir)
