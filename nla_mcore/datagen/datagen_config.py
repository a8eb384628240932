"""Configuration of the datagen stages: corpus, extract, split, build, and the whole pipeline.

Each stage owns one `@dataclass(kw_only=True, slots=True)` with a docstring under every field (the
CLI help) and only OmegaConf-compatible types, so `load_config(DatagenConfig, yaml, overrides)`
reads them; the Explain stage's `ExplainConfig` (explain_config.py) nests as the `explain:` block.

Checks are split in two: `__post_init__` checks ranges and combinations (an impossible value fails
as soon as the config is built), while fields that have no sensible default and must be set for a
run (`extract.corpus.paths`, `extract.base_model`, `output_dir`) are checked by `require_*` when a
stage starts. That keeps `DatagenConfig()` constructible, which OmegaConf needs for the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from nla_mcore import prompts
from nla_mcore.datagen.explain_config import ExplainConfig

STAGES = ("extract", "split", "explain", "build")
SPLIT_NAMES = ("av_sft", "ar_sft", "rl")


class CorpusFormat(str, Enum):
    """How corpus files are read; `auto` picks by extension (.txt, .jsonl/.json, .parquet, +.gz)."""

    auto = "auto"
    txt = "txt"
    jsonl = "jsonl"
    parquet = "parquet"
    hf = "hf"


class TxtMode(str, Enum):
    """A .txt file is one document (`file`) or holds one document per line (`line`)."""

    file = "file"
    line = "line"


class OnDecodeError(str, Enum):
    """A document that is not valid UTF-8: `skip` (counted), `replace` (U+FFFD, counted), `error`."""

    skip = "skip"
    replace = "replace"
    error = "error"


class OnNonFinite(str, Enum):
    """A vector with NaN or inf: `error` (names the file/doc and row) or `skip` (counted)."""

    error = "error"
    skip = "skip"


@dataclass(kw_only=True, slots=True)
class CorpusConfig:
    """Where the documents come from and how to read them."""

    paths: list[str] = field(default_factory=list)
    """Files, directories (searched recursively, sorted) or glob patterns; read in this order."""

    format: CorpusFormat = CorpusFormat.auto
    """auto | txt | jsonl | parquet | hf (Hugging Face `datasets`, needs the package)."""

    txt_mode: TxtMode = TxtMode.file
    """For .txt: `file` = one document per file, `line` = one document per non-empty line."""

    text_field: str = "text"
    """JSONL key / parquet column / HF column holding the document text."""

    id_field: str | None = None
    """Key/column with a document id; null: a stable id from the file and line (or row) number."""

    on_decode_error: OnDecodeError = OnDecodeError.skip
    """Documents with bytes that are not UTF-8: skip (counted), replace with U+FFFD, or error."""

    start: int = 0
    """Corpus records to pass over before the first one used (with max_docs: the corpus slice)."""

    max_docs: int | None = None
    """Corpus records to read after `start` (skipped records count); null: to the end."""

    hf_name: str | None = None
    """`datasets.load_dataset` path (e.g. HuggingFaceFW/fineweb, or `json` with hf_data_files)."""

    hf_config: str | None = None
    """`datasets.load_dataset` config name (e.g. sample-10BT)."""

    hf_split: str = "train"
    """`datasets.load_dataset` split."""

    hf_data_files: list[str] = field(default_factory=list)
    """`datasets.load_dataset` data_files (for the generic json/parquet/text builders)."""

    hf_streaming: bool = True
    """Stream the HF dataset instead of downloading it whole."""

    def __post_init__(self) -> None:
        self.format = CorpusFormat(self.format)
        self.txt_mode = TxtMode(self.txt_mode)
        self.on_decode_error = OnDecodeError(self.on_decode_error)
        if self.start < 0:
            raise ValueError(f"extract.corpus.start={self.start}: set 0 or more")
        if self.max_docs is not None and self.max_docs < 1:
            raise ValueError(f"extract.corpus.max_docs={self.max_docs}: set 1 or more, or null")
        if not self.text_field:
            raise ValueError("extract.corpus.text_field is empty: name the text key/column")
        if self.format is CorpusFormat.hf and self.paths:
            raise ValueError("extract.corpus.format=hf reads hf_name, not paths: clear paths")


@dataclass(kw_only=True, slots=True)
class ExtractConfig:
    """Extract stage: corpus -> token positions -> base-model vectors at layer K -> parquet shards."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """The documents to read."""

    base_model: str = ""
    """Name or path of the base model, recorded in the sidecars (e.g. Qwen/Qwen2.5-7B-Instruct)."""

    layer: int | None = None
    """K: vectors are the output of decoder block K (HF hidden_states[K+1]); null: 2*L//3."""

    seed: int = 0
    """Positions of a document come from an RNG seeded with sha256(f"{seed}|{doc_id}")."""

    positions_per_doc: int = 10
    """Positions (rows) sampled per document; fewer when a document has fewer eligible tokens."""

    min_position: int = 50
    """Smallest token index a position may have (the BOS is index 0)."""

    max_length: int = 4096
    """Documents are truncated to this many tokens (BOS included) before positions are chosen."""

    batch_tokens: int = 32768
    """Padded tokens per model call (documents x longest document); at least max_length."""

    batch_docs: int = 64
    """Documents per model call at most."""

    rows_per_shard: int = 16384
    """Rows per output shard at most; a shard holds rows_per_shard // positions_per_doc documents."""

    row_group_rows: int = 1024
    """Rows per parquet row group."""

    on_nonfinite: OnNonFinite = OnNonFinite.error
    """A NaN/inf vector from the model: error (names doc and position) or skip (counted)."""

    progress: bool = True
    """Show a progress bar (rate, ETA) on stderr (writer ranks only)."""

    def __post_init__(self) -> None:
        self.on_nonfinite = OnNonFinite(self.on_nonfinite)
        _at_least("extract.positions_per_doc", self.positions_per_doc, 1)
        _at_least("extract.min_position", self.min_position, 1)
        _at_least("extract.max_length", self.max_length, self.min_position + 1)
        _at_least("extract.batch_docs", self.batch_docs, 1)
        _at_least("extract.row_group_rows", self.row_group_rows, 1)
        _at_least("extract.rows_per_shard", self.rows_per_shard, self.positions_per_doc)
        if self.layer is not None:
            _at_least("extract.layer", self.layer, 0)
        if self.batch_tokens < self.max_length:
            raise ValueError(
                f"extract.batch_tokens={self.batch_tokens} is below extract.max_length="
                f"{self.max_length}: a longest document must fit one call; raise batch_tokens"
            )

    @property
    def docs_per_shard(self) -> int:
        """Rank-local documents per shard: shard k of a rank holds its documents [k*D, (k+1)*D)."""
        return self.rows_per_shard // self.positions_per_doc


@dataclass(kw_only=True, slots=True)
class SplitConfig:
    """Split stage: assign whole documents to av_sft / ar_sft / rl by a seeded hash of the doc id."""

    av_sft: float = 0.25
    """Fraction of documents for AV-SFT."""

    ar_sft: float = 0.25
    """Fraction of documents for AR-SFT."""

    rl: float = 0.5
    """Fraction of documents for RL."""

    seed: int = 0
    """Documents are ranked by sha256(f"{seed}|split|{doc_id}") and cut at the fractions."""

    progress: bool = True
    """Show a progress bar (rate, ETA) on stderr."""

    def __post_init__(self) -> None:
        fractions = self.fractions()
        if any(f < 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1.0) > 1e-6:
            raise ValueError(
                f"split fractions {fractions} must be >= 0 and sum to 1: adjust "
                "split.av_sft, split.ar_sft, split.rl"
            )

    def fractions(self) -> dict[str, float]:
        """{split name: fraction} in the order documents are cut."""
        return {"av_sft": self.av_sft, "ar_sft": self.ar_sft, "rl": self.rl}


@dataclass(kw_only=True, slots=True)
class BuildConfig:
    """Build stage: explained splits -> training parquets (av_sft, ar_sft, rl) with sidecars."""

    av_template: str = prompts.AV_PROMPT_TEMPLATE
    """AV user message; `{injection_char}` (once) is written as the literal <INJECT> slot."""

    ar_template: str = prompts.AR_PROMPT_TEMPLATE
    """AR input text; `{explanation}` (once) becomes the row's explanation."""

    on_nonfinite: OnNonFinite = OnNonFinite.error
    """A NaN/inf input vector: error (names file and row) or skip (counted)."""

    keep_text: bool = True
    """Carry `detokenized_text_truncated` into the outputs (debugging, evals; costs disk)."""

    activation_shuffle_baseline: bool = False
    """Also write `{split}-activation-shuffled.parquet`: vectors permuted across rows (control)."""

    shuffle_seed: int = 0
    """Seed of the activation-shuffle permutation."""

    batch_rows: int = 4096
    """Rows per streamed batch (and per output row group)."""

    progress: bool = True
    """Show a progress bar (rate, ETA) on stderr."""

    def __post_init__(self) -> None:
        self.on_nonfinite = OnNonFinite(self.on_nonfinite)
        _at_least("build.batch_rows", self.batch_rows, 1)
        for key, template, slot in (
            ("build.av_template", self.av_template, prompts.INJECTION_SLOT),
            ("build.ar_template", self.ar_template, prompts.EXPLANATION_SLOT),
        ):
            if template.count(slot) != 1:
                raise ValueError(f"{key} must contain {slot} exactly once")


@dataclass(kw_only=True, slots=True)
class DatagenConfig:
    """The whole datagen pipeline: extract -> split -> explain -> build, under one output dir."""

    output_dir: str = ""
    """Root of every output: activations/, splits/, explained/, the three built files, summary."""

    stages: list[str] = field(default_factory=lambda: list(STAGES))
    """Stages to run, in pipeline order (e.g. [split, explain, build] after an extract)."""

    explain_rl: bool = False
    """Explain the RL split too (RL trains without them; they cost as much as both SFT splits)."""

    extract: ExtractConfig = field(default_factory=ExtractConfig)
    """Extract stage."""

    split: SplitConfig = field(default_factory=SplitConfig)
    """Split stage."""

    explain: ExplainConfig = field(default_factory=ExplainConfig)
    """Explain stage (docs/datagen-explain.md)."""

    build: BuildConfig = field(default_factory=BuildConfig)
    """Build stage."""

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown or not self.stages:
            raise ValueError(f"stages={self.stages}: choose a non-empty subset of {list(STAGES)}")
        self.stages = [s for s in STAGES if s in self.stages]


def require_run_fields(cfg: DatagenConfig) -> None:
    """Fields with no default that a pipeline run needs; the message names the key to set."""
    if not cfg.output_dir:
        raise ValueError("output_dir is empty: set output_dir=/path/for/datagen/outputs")
    if "extract" in cfg.stages:
        require_extract_fields(cfg.extract)


def require_extract_fields(cfg: ExtractConfig) -> None:
    """`extract.base_model` and a corpus source must be set before extracting."""
    if not cfg.base_model:
        raise ValueError("extract.base_model is empty: set the base model's name or path")
    corpus = cfg.corpus
    if corpus.format is CorpusFormat.hf:
        if not corpus.hf_name:
            raise ValueError("extract.corpus.format=hf needs extract.corpus.hf_name")
    elif not corpus.paths:
        raise ValueError("extract.corpus.paths is empty: list corpus files, dirs or globs")


def _at_least(key: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f"{key}={value}: set it to at least {minimum}")
