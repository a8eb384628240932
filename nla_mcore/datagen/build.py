"""Build stage: (explained) split parquets -> the training files `av_sft`, `ar_sft`, `rl`.

    build_split(cfg, stage, input_path, output_path, tokenizer) -> BuildSummary
    run_build(cfg, tokenizer, inputs={stage: path}, out_dir) -> dict[stage, BuildSummary]

Output columns (every file also carries `doc_id` and, when the input has them, `position`,
`n_raw_tokens`, `activation_layer`, and `detokenized_text_truncated` unless keep_text=false):

| stage | `prompt` | `response` | vector |
|---|---|---|---|
| av_sft | `list<struct<role: string, content: string>>`: one user message, the AV template with the literal slot `<INJECT>` | `"<explanation>\\n{explanation}\\n</explanation>"` | `activation_vector fixed_size_list<float32>[d]` |
| ar_sft | `string`: the AR prompt for the explanation, ending in the AR suffix | — | same |
| rl | as av_sft | — (an `explanation` column is kept when the input was explained) | same |

Validation, before anything is written: the input's sidecar must exist (it carries d and the
layer); its vectors must have width d; the marker is chosen from the live tokenizer, checked
against the marker recorded at extraction (`check_marker`: a different tokenizer fails naming
the field that drifted), and the output sidecar must pass the loaders' `check_marker` (and, for
ar_sft, `check_ar_suffix`). While streaming: a vector with NaN/inf is an error naming the file,
row and document, or a counted drop (`on_nonfinite`); an SFT row whose explanation failed is
dropped and counted by its failure reason; an AR prompt whose token ids do not end with the
sidecar's `critic_suffix_ids` is dropped and counted (the AR reads its vector at the last token).

Activation-shuffle baseline (`activation_shuffle_baseline`): a second file
`{stage}-activation-shuffled.parquet`, the same rows with the vectors permuted by a seeded single
cycle (no row keeps its own vector), for the control experiment that measures how much the
vector matters. Its sidecar says so under `activation_shuffle`. The kept vectors are spooled to
a temporary .npy memmap in the output directory, so neither pass holds them all in memory.

Legend: N = rows of a batch, D = d_model.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from nla_mcore import prompts
from nla_mcore.datagen.datagen_config import SPLIT_NAMES, BuildConfig, OnNonFinite
from nla_mcore.datagen.parquet_io import (
    PROVENANCE_COLUMNS,
    TEXT_COLUMN,
    VECTOR_COLUMN,
    AtomicParquetWriter,
    nonfinite_rows,
    open_parquet,
    require_columns,
    vector_array,
    vector_type,
    vector_width,
    vectors_ND,
)
from nla_mcore.sidecar import (
    DatasetSidecar,
    PromptTemplates,
    Provenance,
    Tokens,
    check_ar_suffix,
    check_marker,
    make_tokens,
    read_dataset_sidecar,
    write_dataset_sidecar,
)

log = logging.getLogger(__name__)

MESSAGE_TYPE = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])
CHAT_PROMPT_TYPE = pa.list_(MESSAGE_TYPE)
EXPLAIN_COLUMNS = ("explanation", "explain_status", "explain_failure")
SHUFFLED_SUFFIX = "-activation-shuffled"


@dataclass(slots=True)
class BuildSummary:
    """One built file: rows in and out, drops by reason."""

    stage: str
    input_path: str
    output_path: str
    rows_in: int = 0
    rows_out: int = 0
    dropped: Counter = field(default_factory=Counter)
    shuffled_path: str | None = None
    seconds: float = 0.0

    def format(self) -> str:
        dropped = ", ".join(f"{r}={n}" for r, n in sorted(self.dropped.items())) or "none"
        lines = [
            f"build {self.stage}: {self.rows_out} of {self.rows_in} rows -> {self.output_path} "
            f"(dropped {sum(self.dropped.values())}: {dropped}; {self.seconds:.1f} s)"
        ]
        if self.shuffled_path:
            lines.append(f"  activation-shuffled baseline -> {self.shuffled_path}")
        return "\n".join(lines)


@dataclass(slots=True)
class _Build:
    """What every batch of one build needs."""

    cfg: BuildConfig
    stage: str
    input_path: Path
    d_model: int
    tokenizer: Any
    tokens: Tokens
    schema: pa.Schema
    explained: bool
    summary: BuildSummary
    spool: np.ndarray | None = None
    """[rows_in, D] memmap of the kept vectors, for the shuffled baseline."""


def run_build(
    cfg: BuildConfig, tokenizer: Any, inputs: dict[str, str | Path], out_dir: str | Path
) -> dict[str, BuildSummary]:
    """Build `{out_dir}/{stage}.parquet` for each `{stage: input parquet}`."""
    return {
        stage: build_split(cfg, stage, path, Path(out_dir) / f"{stage}.parquet", tokenizer)
        for stage, path in inputs.items()
    }


def build_split(
    cfg: BuildConfig,
    stage: str,
    input_path: str | Path,
    output_path: str | Path,
    tokenizer: Any,
) -> BuildSummary:
    """Validate `input_path` and write the `stage` training file (+ sidecar, + baseline)."""
    started = time.monotonic()
    if stage not in SPLIT_NAMES:
        raise ValueError(f"unknown build stage {stage!r}: expected one of {SPLIT_NAMES}")
    input_path, output_path = Path(input_path), Path(output_path)
    source = open_parquet(input_path, f"{stage} build input")
    in_sidecar = read_dataset_sidecar(input_path)
    d_model = checked_input_schema(stage, input_path, source.schema_arrow, in_sidecar)
    tokens = checked_tokens(cfg, stage, tokenizer, in_sidecar)
    out_sidecar = output_sidecar(cfg, stage, in_sidecar, tokens, input_path)
    check_marker(out_sidecar, tokenizer)
    if stage == "ar_sft":
        check_ar_suffix(out_sidecar, tokenizer)
    build = _Build(
        cfg=cfg,
        stage=stage,
        input_path=input_path,
        d_model=d_model,
        tokenizer=tokenizer,
        tokens=tokens,
        schema=output_schema(cfg, stage, source.schema_arrow, d_model),
        explained="explanation" in source.schema_arrow.names,
        summary=BuildSummary(stage, str(input_path), str(output_path)),
    )
    spool_path = output_path.with_name(f".{output_path.name}.vectors-{os.getpid()}.npy")
    try:
        if cfg.activation_shuffle_baseline:
            shape = (max(source.metadata.num_rows, 1), d_model)
            build.spool = np.lib.format.open_memmap(spool_path, "w+", np.float32, shape)
        write_built_file(build, source, output_path)
        out_sidecar.row_count = build.summary.rows_out
        write_dataset_sidecar(output_path, out_sidecar)
        if build.spool is not None:
            build.summary.shuffled_path = str(write_shuffled(build, output_path, out_sidecar))
    finally:
        build.spool = None
        spool_path.unlink(missing_ok=True)
    build.summary.seconds = time.monotonic() - started
    log.info(build.summary.format())
    return build.summary


# --- validation --------------------------------------------------------------------------------


def checked_input_schema(stage: str, path: Path, schema: pa.Schema, sidecar: DatasetSidecar) -> int:
    """d_model, after checking the columns this stage needs and the vector width."""
    needed = [VECTOR_COLUMN, "doc_id"]
    if stage != "rl":
        needed += list(EXPLAIN_COLUMNS)
    hint = "" if stage == "rl" else ": pass the Explain stage's output for this split"
    require_columns(path, schema, needed, f"{stage} build input", hint)
    d_model = sidecar.extraction.d_model
    width = vector_width(path, schema)
    if width is not None and width != d_model:
        raise ValueError(
            f"{path}: vectors have d={width}, its sidecar says extraction.d_model={d_model}"
        )
    return d_model


def checked_tokens(
    cfg: BuildConfig, stage: str, tokenizer: Any, in_sidecar: DatasetSidecar
) -> Tokens:
    """The live tokenizer's marker (and AR suffix for ar_sft), checked against extraction's."""
    if in_sidecar.tokens is not None and in_sidecar.prompt_templates is not None:
        check_marker(in_sidecar, tokenizer)
    ar_template = cfg.ar_template if stage == "ar_sft" else None
    return make_tokens(tokenizer, av_template=cfg.av_template, ar_template=ar_template)


def output_sidecar(
    cfg: BuildConfig, stage: str, in_sidecar: DatasetSidecar, tokens: Tokens, input_path: Path
) -> DatasetSidecar:
    extra = {k: v for k, v in in_sidecar.extra.items() if k not in ("activation_shuffle",)}
    return DatasetSidecar(
        stage=stage,
        row_count=0,
        extraction=in_sidecar.extraction,
        tokens=tokens,
        prompt_templates=PromptTemplates(av=cfg.av_template, ar=cfg.ar_template),
        api_summaries=in_sidecar.api_summaries,
        parent_datasets=[str(input_path)],
        provenance=Provenance.current(),
        extra=extra,
    )


# --- columns -----------------------------------------------------------------------------------


def output_schema(cfg: BuildConfig, stage: str, source: pa.Schema, d_model: int) -> pa.Schema:
    fields = [pa.field("prompt", pa.string() if stage == "ar_sft" else CHAT_PROMPT_TYPE)]
    if stage == "av_sft":
        fields.append(pa.field("response", pa.string()))
    fields.append(pa.field(VECTOR_COLUMN, vector_type(d_model)))
    carried = [*PROVENANCE_COLUMNS, *([TEXT_COLUMN] if cfg.keep_text else [])]
    if stage == "rl":
        carried.append("explanation")
    fields += [source.field(name) for name in carried if name in source.names]
    return pa.schema(fields)


def write_built_file(build: _Build, source: pq.ParquetFile, output_path: Path) -> None:
    bar = tqdm(
        total=source.metadata.num_rows,
        unit="row",
        desc=f"build {build.stage}",
        disable=not build.cfg.progress,
        dynamic_ncols=True,
    )
    with bar, AtomicParquetWriter(output_path, build.schema) as writer:
        for batch in source.iter_batches(batch_size=build.cfg.batch_rows):
            table = built_batch(build, batch, first_row=build.summary.rows_in)
            build.summary.rows_in += batch.num_rows
            writer.write(table)
            bar.update(batch.num_rows)


def built_batch(build: _Build, batch: pa.RecordBatch, first_row: int) -> pa.Table:
    """The output rows of one input batch (kept rows only), in input order."""
    vec_ND = vectors_ND(
        batch.column(VECTOR_COLUMN), build.d_model, str(build.input_path), first_row
    )
    keep_N = finite_mask(build, batch, vec_ND, first_row)
    if build.stage != "rl":
        keep_N &= explained_mask(build, batch)
    columns: dict[str, pa.Array] = {}
    if build.stage == "ar_sft":
        columns["prompt"] = ar_prompts(build, batch, keep_N)
    else:
        columns["prompt"] = pa.array([av_chat(build.cfg)] * int(keep_N.sum()), CHAT_PROMPT_TYPE)
    kept = batch.filter(pa.array(keep_N))
    if build.stage == "av_sft":
        explanations = kept.column("explanation").to_pylist()
        columns["response"] = pa.array([prompts.format_av_target(e) for e in explanations])
    columns[VECTOR_COLUMN] = vector_array(vec_ND[keep_N])
    for name in build.schema.names[len(columns) :]:
        columns[name] = kept.column(name)
    spool_vectors(build, vec_ND[keep_N])
    build.summary.rows_out += int(keep_N.sum())
    return pa.table(columns, schema=build.schema)


def av_chat(cfg: BuildConfig) -> list[dict[str, str]]:
    """The AV chat with the literal `<INJECT>` slot (the loader puts the marker there)."""
    return prompts.av_messages(prompts.INJECT_PLACEHOLDER, cfg.av_template)


def finite_mask(
    build: _Build, batch: pa.RecordBatch, vec_ND: np.ndarray, first_row: int
) -> np.ndarray:
    bad = nonfinite_rows(vec_ND)
    if bad.size and build.cfg.on_nonfinite is OnNonFinite.error:
        doc_id = batch.column("doc_id")[int(bad[0])].as_py()
        raise ValueError(
            f"{build.input_path}: row {first_row + int(bad[0])} (doc_id {doc_id!r}) has a NaN/inf "
            f"{VECTOR_COLUMN} ({bad.size} such row(s) in rows {first_row}.."
            f"{first_row + batch.num_rows - 1}); set build.on_nonfinite=skip to drop them"
        )
    if bad.size:
        build.summary.dropped["nonfinite_vector"] += int(bad.size)
    keep_N = np.ones(batch.num_rows, dtype=bool)
    keep_N[bad] = False
    return keep_N


def explained_mask(build: _Build, batch: pa.RecordBatch) -> np.ndarray:
    """Rows with a usable explanation; the others are counted by failure reason."""
    statuses = batch.column("explain_status").to_pylist()
    failures = batch.column("explain_failure").to_pylist()
    explanations = batch.column("explanation").to_pylist()
    keep_N = np.ones(batch.num_rows, dtype=bool)
    for row, (status, failure, text) in enumerate(
        zip(statuses, failures, explanations, strict=True)
    ):
        if status != "ok" or text is None or not text.strip():
            keep_N[row] = False
            build.summary.dropped[f"explain_failed:{failure or 'no_explanation'}"] += 1
    return keep_N


def ar_prompts(build: _Build, batch: pa.RecordBatch, keep_N: np.ndarray) -> pa.Array:
    """AR prompt strings of the kept rows; rows whose ids lose the suffix are dropped (keep_N)."""
    suffix = build.tokens.critic_suffix_ids or []
    explanations = batch.column("explanation").to_pylist()
    rows = np.flatnonzero(keep_N)
    texts = [prompts.format_ar_prompt(explanations[r], build.cfg.ar_template) for r in rows]
    ids = build.tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    kept_texts = []
    for row, text, token_ids in zip(rows, texts, ids, strict=True):
        if list(token_ids[-len(suffix) :]) == suffix:
            kept_texts.append(text)
        else:
            keep_N[row] = False
            build.summary.dropped["ar_suffix_mismatch"] += 1
    return pa.array(kept_texts, pa.string())


# --- activation-shuffle baseline ---------------------------------------------------------------


def spool_vectors(build: _Build, vec_ND: np.ndarray) -> None:
    if build.spool is not None:
        start = build.summary.rows_out
        build.spool[start : start + len(vec_ND)] = vec_ND


def single_cycle(n_rows: int, seed: int) -> np.ndarray:
    """source_of[i] = the row whose vector row i gets; one cycle over all rows (no fixed point)."""
    order = np.random.default_rng(seed).permutation(n_rows)
    source_of = np.empty(n_rows, dtype=np.int64)
    source_of[order] = np.roll(order, -1)
    return source_of


def write_shuffled(build: _Build, built_path: Path, sidecar: DatasetSidecar) -> Path:
    """The built file again with the vectors permuted across rows; returns its path."""
    path = built_path.with_name(built_path.stem + SHUFFLED_SUFFIX + built_path.suffix)
    n_rows = build.summary.rows_out
    source_of = single_cycle(n_rows, build.cfg.shuffle_seed)
    if n_rows == 1:
        log.warning("%s: one row, the activation-shuffled baseline equals the data", built_path)
    built = open_parquet(built_path, "built file")
    start = 0
    with AtomicParquetWriter(path, build.schema) as writer:
        for batch in built.iter_batches(batch_size=build.cfg.batch_rows):
            vec_ND = build.spool[source_of[start : start + batch.num_rows]]
            index = build.schema.get_field_index(VECTOR_COLUMN)
            writer.write(batch.set_column(index, VECTOR_COLUMN, vector_array(vec_ND)))
            start += batch.num_rows
    sidecar.extra = {
        **sidecar.extra,
        "activation_shuffle": {
            "seed": build.cfg.shuffle_seed,
            "source": built_path.name,
            "note": "control baseline: vectors permuted across rows; not training data",
        },
    }
    sidecar.parent_datasets = [str(built_path)]
    write_dataset_sidecar(path, sidecar)
    return path
