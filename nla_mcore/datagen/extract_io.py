"""Files of the Extract stage: shard names, the per-rank manifest (resume), shard sidecars.

Layout of an extract directory:

    activations-dp{r:03d}-{k:05d}.parquet                 shard k of DP rank r (maybe 0 rows)
    activations-dp{r:03d}-{k:05d}.parquet.nla_meta.yaml   its dataset sidecar (stage: base)
    extract-manifest-dp{r:03d}.json                       rank r's progress

Shard k of rank r holds the rows of rank r's documents [k*D, (k+1)*D) (D = docs_per_shard) in
corpus order, so its contents are a pure function of the corpus and the config. The manifest
lists the complete shards with their counts, the `fingerprint` of every setting that changes the
contents, and `complete: true` once the rank's documents are exhausted. It is rewritten
atomically after each shard (shard parquet -> sidecar -> manifest): a shard counts as done only
once the manifest names it, so a kill between the rename and the manifest costs one shard, which
the next run writes again, identically. The manifest holds no timestamps, so an interrupted and
an uninterrupted run leave identical manifests too.

Sidecars are per shard (each shard is a valid dataset on its own: explain or inspect any one);
the Split stage merges them into one sidecar per split. Batch settings are not in the
fingerprint: a run resumed with a smaller `batch_tokens` (after an out-of-memory error) is
allowed, at the price of floating-point differences in the low bits between its shards and
those of the first run.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from nla_mcore import prompts
from nla_mcore.datagen.corpus import describe_corpus
from nla_mcore.datagen.datagen_config import ExtractConfig
from nla_mcore.datagen.parquet_io import write_json_atomically
from nla_mcore.sidecar import (
    DatasetExtraction,
    DatasetSidecar,
    PromptTemplates,
    Provenance,
    Tokens,
    make_tokens,
)

MANIFEST_FORMAT = 1
MANIFEST_RE = re.compile(r"extract-manifest-dp(\d{3})\.json$")


class ExtractError(RuntimeError):
    """The extraction cannot go on (config drift on resume, a provider that misbehaves, NaN)."""


def shard_name(dp_rank: int, index: int) -> str:
    return f"activations-dp{dp_rank:03d}-{index:05d}.parquet"


def manifest_path(out_dir: Path, dp_rank: int) -> Path:
    return out_dir / f"extract-manifest-dp{dp_rank:03d}.json"


@dataclass(slots=True)
class ShardStats:
    """Counts of one shard (or, summed, of a run)."""

    docs_read: int = 0
    docs_used: int = 0
    rows: int = 0
    skipped_docs: Counter = field(default_factory=Counter)
    dropped_rows: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    tokens_in_docs: int = 0
    tokens_forwarded: int = 0

    def add(self, other: ShardStats) -> None:
        self.docs_read += other.docs_read
        self.docs_used += other.docs_used
        self.rows += other.rows
        self.skipped_docs.update(other.skipped_docs)
        self.dropped_rows.update(other.dropped_rows)
        self.notes.update(other.notes)
        self.tokens_in_docs += other.tokens_in_docs
        self.tokens_forwarded += other.tokens_forwarded

    def to_json(self) -> dict[str, Any]:
        return {
            "docs_read": self.docs_read,
            "docs_used": self.docs_used,
            "rows": self.rows,
            "skipped_docs": dict(sorted(self.skipped_docs.items())),
            "dropped_rows": dict(sorted(self.dropped_rows.items())),
            "notes": dict(sorted(self.notes.items())),
            "tokens_in_docs": self.tokens_in_docs,
            "tokens_forwarded": self.tokens_forwarded,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardStats:
        counters = {
            k: Counter(data.get(k) or {}) for k in ("skipped_docs", "dropped_rows", "notes")
        }
        scalars = {k: int(data[k]) for k in ("docs_read", "docs_used", "rows")}
        tokens = {k: int(data[k]) for k in ("tokens_in_docs", "tokens_forwarded")}
        return cls(**scalars, **counters, **tokens)


@dataclass(slots=True)
class ExtractManifest:
    """Progress of one DP rank: the fingerprint of its settings and its complete shards."""

    dp_rank: int
    dp_size: int
    docs_per_shard: int
    fingerprint: dict[str, Any]
    shards: list[dict[str, Any]] = field(default_factory=list)
    complete: bool = False

    def stats(self) -> ShardStats:
        total = ShardStats()
        for shard in self.shards:
            total.add(ShardStats.from_json(shard["stats"]))
        return total

    def save(self, out_dir: Path) -> None:
        data = {"format": MANIFEST_FORMAT, **asdict(self)}
        write_json_atomically(manifest_path(out_dir, self.dp_rank), data)

    @classmethod
    def load(cls, path: Path) -> ExtractManifest:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ExtractError(f"extract manifest {path} is not valid JSON: {err}") from err
        if data.pop("format", None) != MANIFEST_FORMAT:
            raise ExtractError(
                f"extract manifest {path}: unknown format (expected {MANIFEST_FORMAT})"
            )
        return cls(**data)


def fingerprint(
    cfg: ExtractConfig, *, layer: int, d_model: int, tokenizer: Any, dp_size: int
) -> dict[str, Any]:
    """Every setting that changes what a shard contains (JSON-ready)."""
    corpus = {k: _plain(v) for k, v in asdict(cfg.corpus).items()}
    return {
        "corpus": corpus,
        "base_model": cfg.base_model,
        "layer": layer,
        "d_model": d_model,
        "tokenizer": prompts.tokenizer_name(tokenizer),
        "vocab_size": len(tokenizer),
        "seed": cfg.seed,
        "positions_per_doc": cfg.positions_per_doc,
        "min_position": cfg.min_position,
        "max_length": cfg.max_length,
        "docs_per_shard": cfg.docs_per_shard,
        "dp_size": dp_size,
        "on_nonfinite": cfg.on_nonfinite.value,
    }


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def start_manifest(
    out_dir: Path, dp_rank: int, dp_size: int, docs_per_shard: int, prints: dict[str, Any]
) -> ExtractManifest:
    """The rank's manifest to continue from (checked against `prints`), or a fresh one."""
    path = manifest_path(out_dir, dp_rank)
    if not path.exists():
        return ExtractManifest(dp_rank, dp_size, docs_per_shard, prints)
    manifest = ExtractManifest.load(path)
    changed = {
        key: (manifest.fingerprint.get(key), value)
        for key, value in prints.items()
        if manifest.fingerprint.get(key) != value
    }
    if changed:
        details = "; ".join(f"{k}: was {old!r}, now {new!r}" for k, (old, new) in changed.items())
        raise ExtractError(
            f"{out_dir} holds an extraction made with other settings ({details}); resume with "
            "the same settings, or write to a new directory"
        )
    missing = [s["file"] for s in manifest.shards if not (out_dir / s["file"]).is_file()]
    if missing:
        raise ExtractError(f"{path} lists shards that are missing: {', '.join(missing)}")
    return manifest


def remove_stale_temporaries(out_dir: Path, dp_rank: int) -> list[Path]:
    """Delete this rank's temporary files left by a killed run (only its writer makes them)."""
    stale = [
        *out_dir.glob(f".activations-dp{dp_rank:03d}-*.tmp*"),
        *out_dir.glob(f".{manifest_path(out_dir, dp_rank).name}.tmp*"),
    ]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def read_manifests(extract_dir: Path) -> list[ExtractManifest]:
    """Every rank's manifest, checked: one dp_size, every rank present and complete."""
    paths = sorted(
        p for p in extract_dir.glob("extract-manifest-dp*.json") if MANIFEST_RE.search(p.name)
    )
    if not paths:
        raise FileNotFoundError(f"no extract manifest (extract-manifest-dp*.json) in {extract_dir}")
    manifests = [ExtractManifest.load(p) for p in paths]
    dp_size = manifests[0].dp_size
    ranks = sorted(m.dp_rank for m in manifests)
    if any(m.dp_size != dp_size for m in manifests) or ranks != list(range(dp_size)):
        raise ExtractError(
            f"{extract_dir}: manifests of ranks {ranks} do not make one run of dp_size={dp_size}"
        )
    unfinished = [m.dp_rank for m in manifests if not m.complete]
    if unfinished:
        raise ExtractError(
            f"{extract_dir}: the extraction of DP rank(s) {unfinished} is not complete; "
            "run the Extract stage again (it resumes)"
        )
    return manifests


def shard_sidecar(
    cfg: ExtractConfig,
    *,
    rows: int,
    layer: int,
    d_model: int,
    tokens: Tokens | None,
    corpus_slice: dict[str, Any],
) -> DatasetSidecar:
    return DatasetSidecar(
        stage="base",
        row_count=rows,
        extraction=DatasetExtraction(
            base_model=cfg.base_model,
            d_model=d_model,
            layer_index=layer,
            norm="none",
            corpus=describe_corpus(cfg.corpus),
            corpus_slice=corpus_slice,
            positions_per_doc=cfg.positions_per_doc,
            extra={
                "seed": cfg.seed,
                "min_position": cfg.min_position,
                "max_length": cfg.max_length,
            },
        ),
        tokens=tokens,
        prompt_templates=PromptTemplates() if tokens is not None else None,
        provenance=Provenance.current(),
    )


def base_tokens(tokenizer: Any) -> Tokens | None:
    """The marker ids for the sidecar, when the tokenizer has a chat template (else None)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    return make_tokens(tokenizer)
