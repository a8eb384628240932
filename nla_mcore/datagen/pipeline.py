"""The datagen pipeline: extract -> split -> explain -> build, under one output directory.

    run_pipeline(cfg, provider, tokenizer) -> PipelineSummary            # one process
    finish_pipeline(cfg, tokenizer) -> PipelineSummary                   # split, explain, build

Layout of `output_dir`:

    activations/   Extract shards, their sidecars, one manifest per DP rank
    splits/        {av_sft,ar_sft,rl}.parquet: the shards' rows, split by document
    explained/     {av_sft,ar_sft}.parquet (+ rl with explain_rl): the splits + explanations
    {av_sft,ar_sft,rl}.parquet (+ sidecars, + *-activation-shuffled.parquet if asked)
    datagen-summary.json

Multi-rank runs: every rank calls `run_extract` (extract.py) on its DP share, then, after a
barrier, one rank calls `finish_pipeline`. `run_pipeline` is exactly that for a single process.

Explaining RL: off by default (`explain_rl`). RL training only needs the prompt and the vector
(the reward comes from the live AR), and the RL split is half the data, so explaining it doubles
the API cost; the original pipeline explained only the SFT splits. Turn it on to keep reference
explanations for evaluation: the rl file then carries an `explanation` column and keeps every row,
explained or not.

Every stage can be rerun: extraction resumes from its manifests, explanations come from the
answer cache (a rerun pays for nothing twice), and split and build rewrite their files
atomically. `stages` selects which ones run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nla_mcore.datagen.build import BuildSummary, build_split
from nla_mcore.datagen.datagen_config import DatagenConfig, require_run_fields
from nla_mcore.datagen.explain import ExplainSummary, run_explain
from nla_mcore.datagen.extract import ExtractSummary, collect_extract, run_extract
from nla_mcore.datagen.parquet_io import write_json_atomically
from nla_mcore.datagen.providers import ActivationProvider
from nla_mcore.datagen.split import SplitSummary, run_split

log = logging.getLogger(__name__)

SUMMARY_NAME = "datagen-summary.json"


@dataclass(frozen=True, slots=True)
class PipelinePaths:
    """Where each stage reads and writes, under `output_dir`."""

    root: Path

    @property
    def activations(self) -> Path:
        return self.root / "activations"

    @property
    def splits(self) -> Path:
        return self.root / "splits"

    def split(self, name: str) -> Path:
        return self.splits / f"{name}.parquet"

    def explained(self, name: str) -> Path:
        return self.root / "explained" / f"{name}.parquet"

    def built(self, name: str) -> Path:
        return self.root / f"{name}.parquet"


@dataclass(slots=True)
class PipelineSummary:
    """Every stage's summary; `format()` is the end-of-run report."""

    output_dir: str
    extract: ExtractSummary | None = None
    split: SplitSummary | None = None
    explain: dict[str, ExplainSummary] = field(default_factory=dict)
    build: dict[str, BuildSummary] = field(default_factory=dict)
    seconds: float = 0.0

    def format(self) -> str:
        parts = [f"datagen summary: {self.output_dir} ({self.seconds:.1f} s)"]
        if self.extract is not None:
            parts.append(self.extract.format())
        if self.split is not None:
            parts.append(self.split.format())
        parts += [s.format() for s in self.explain.values()]
        if self.explain:
            cost = sum(s.cost_usd for s in self.explain.values())
            tokens_in = sum(s.input_tokens for s in self.explain.values())
            tokens_out = sum(s.output_tokens for s in self.explain.values())
            parts.append(
                f"explain total: API tokens in {tokens_in:,}, out {tokens_out:,}; cost ${cost:,.4f}"
            )
        parts += [s.format() for s in self.build.values()]
        return "\n".join(parts)

    def to_json(self) -> dict[str, Any]:
        extract = None
        if self.extract is not None:
            extract = {"shards": len(self.extract.shards), **self.extract.stats.to_json()}
        return {
            "output_dir": self.output_dir,
            "seconds": round(self.seconds, 3),
            "extract": extract,
            "split": None
            if self.split is None
            else {"docs": self.split.docs, "rows": self.split.rows, "files": self.split.files},
            "explain": {name: explain_json(s) for name, s in self.explain.items()},
            "build": {name: build_json(s) for name, s in self.build.items()},
        }


def explain_json(summary: ExplainSummary) -> dict[str, Any]:
    return {
        "rows": summary.rows,
        "ok": summary.ok,
        "failed_by_reason": summary.failed_by_reason,
        "cache_hits": summary.cache_hits,
        "requests_sent": summary.requests_sent,
        "input_tokens": summary.input_tokens,
        "output_tokens": summary.output_tokens,
        "cost_usd": summary.cost_usd,
    }


def build_json(summary: BuildSummary) -> dict[str, Any]:
    return {
        "output": summary.output_path,
        "rows_in": summary.rows_in,
        "rows_out": summary.rows_out,
        "dropped": dict(summary.dropped),
        "activation_shuffled": summary.shuffled_path,
    }


def run_pipeline(
    cfg: DatagenConfig, provider: ActivationProvider | None, tokenizer: Any
) -> PipelineSummary:
    """Every configured stage in one process (DP size 1); `provider` only for extract."""
    started = time.monotonic()
    require_run_fields(cfg)
    paths = PipelinePaths(Path(cfg.output_dir))
    extract = None
    if "extract" in cfg.stages:
        if provider is None:
            raise ValueError("the extract stage needs an activation provider")
        extract = run_extract(cfg.extract, provider, tokenizer, out_dir=paths.activations)
    return finish_pipeline(cfg, tokenizer, extract=extract, started=started)


def finish_pipeline(
    cfg: DatagenConfig,
    tokenizer: Any,
    *,
    extract: ExtractSummary | None = None,
    started: float | None = None,
) -> PipelineSummary:
    """Split, explain and build (the configured ones) after every rank finished extracting.

    `extract`: this process's extract summary, to report; by default the manifests are read.
    """
    started = time.monotonic() if started is None else started
    require_run_fields(cfg)
    paths = PipelinePaths(Path(cfg.output_dir))
    summary = PipelineSummary(output_dir=str(paths.root), extract=extract)
    if extract is None and any(paths.activations.glob("extract-manifest-dp*.json")):
        summary.extract = collect_extract(paths.activations)
    if "split" in cfg.stages:
        summary.split = run_split(cfg.split, paths.activations, paths.splits)
    if "explain" in cfg.stages:
        for name in explained_splits(cfg):
            summary.explain[name] = run_explain(
                cfg.explain, paths.split(name), paths.explained(name)
            )
    if "build" in cfg.stages:
        for name, source in build_inputs(cfg, paths).items():
            summary.build[name] = build_split(cfg.build, name, source, paths.built(name), tokenizer)
    summary.seconds = time.monotonic() - started
    write_json_atomically(paths.root / SUMMARY_NAME, summary.to_json())
    log.info(summary.format())
    return summary


def explained_splits(cfg: DatagenConfig) -> list[str]:
    return ["av_sft", "ar_sft"] + (["rl"] if cfg.explain_rl else [])


def build_inputs(cfg: DatagenConfig, paths: PipelinePaths) -> dict[str, Path]:
    """{stage: input}: explained files for the SFT splits, rl explained only if asked."""
    explained = set(explained_splits(cfg))
    return {
        name: paths.explained(name) if name in explained else paths.split(name)
        for name in ("av_sft", "ar_sft", "rl")
    }


# --- command line (Hugging Face reference provider) -------------------------------------------


def main_datagen(argv: Sequence[str] | None = None) -> int:
    """`datagen --config C [key=value ...]` with the Hugging Face reference provider."""
    parser = argparse.ArgumentParser(prog="nla-mcore datagen", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML with the DatagenConfig fields")
    parser.add_argument("--device", default=None, help="torch device for the HF model (cuda, cpu)")
    parser.add_argument("--dtype", default="bfloat16", help="HF model dtype (bfloat16, float32)")
    parser.add_argument("overrides", nargs="*", help="DatagenConfig fields as dotted key=value")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = load_datagen_config(args.config, args.overrides)
        require_run_fields(cfg)
        provider, tokenizer = hf_provider_and_tokenizer(cfg, args.device, args.dtype)
        summary = run_pipeline(cfg, provider, tokenizer)
    except (OSError, ValueError, RuntimeError) as err:
        print(f"nla-mcore datagen: error: {err}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0


def load_datagen_config(path: str | None, overrides: Sequence[str]) -> DatagenConfig:
    from nla_mcore.config import load_config

    return load_config(DatagenConfig, path, list(overrides))


def hf_provider_and_tokenizer(
    cfg: DatagenConfig, device: str | None, dtype: str
) -> tuple[ActivationProvider | None, Any]:
    """The HF reference provider (only when extracting) and the base model's tokenizer."""
    import torch
    from transformers import AutoTokenizer

    from nla_mcore.datagen.providers import HFActivationProvider

    if not cfg.extract.base_model:
        raise ValueError("extract.base_model is empty: set the base model's name or path")
    tokenizer = AutoTokenizer.from_pretrained(cfg.extract.base_model)
    if "extract" not in cfg.stages:
        return None, tokenizer
    provider = HFActivationProvider(
        cfg.extract.base_model, cfg.extract.layer, device=device, dtype=getattr(torch, dtype)
    )
    return provider, tokenizer


if __name__ == "__main__":
    sys.exit(main_datagen())
