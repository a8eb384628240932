"""Explain stage: activation parquet -> the same rows plus an explanation of each row's text.

    run_explain(cfg, input_path, output_path) -> ExplainSummary

1. Read only the text column (`detokenized_text_truncated`); blank texts fail as `empty_text`
   with no request. Texts are deduplicated by cache key, so a text is asked for once per run.
2. Look every key up in the answer cache (`explain_cache.py`); a re-run, a killed run restarted,
   or a run over another dataset sharing texts asks only for what is missing.
3. Print a cost estimate for the missing texts (approximate: characters / 3.5 for input tokens, a
   typical and a `max_tokens` bound for output; batches at half price), and stop if it exceeds
   `max_estimated_cost_usd`.
4. Ask the explainer (Messages API with bounded concurrency, Message Batches, or the offline
   explainer), caching each answer the moment it arrives. No explainer (and no key) is needed when
   everything is cached.
5. Stream the input's row groups to a temporary parquet with three new columns
   (`explanation`, `explain_status`, `explain_failure`), rename it into place, carry the sidecar.

Memory holds the texts and answers, never the activation vectors (they are streamed in step 5).
Trade-off: output is written only once every text has an answer, so a crash loses no paid work
(it is in the cache) but the output appears only at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from nla_mcore.datagen.explain_cache import AnswerCache, cache_key
from nla_mcore.datagen.explain_config import TEXT_SLOT, ExplainConfig, ExplainerKind
from nla_mcore.datagen.explain_io import carry_sidecar, check_output_path, read_texts, write_output
from nla_mcore.datagen.explainers import (
    OFFLINE_MODEL_ID,
    Answer,
    CallStats,
    Explainer,
    ExplainError,
    OfflineExplainer,
    is_blank,
)

if TYPE_CHECKING:
    from nla_mcore.datagen.anthropic_batches import BatchRunner

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 3.5  # errs high: English runs ~3.5-4 chars/token on current Claude tokenizers
TYPICAL_OUTPUT_TOKENS = 250  # ~100 words, the tags and a little low-effort thinking


@dataclass(frozen=True, slots=True)
class CostEstimate:
    requests: int
    input_tokens: int
    typical_usd: float
    max_usd: float

    def format(self, cfg: ExplainConfig) -> str:
        if cfg.explainer is ExplainerKind.offline:
            return f"explain: {self.requests} text(s) to explain offline (no cost)"
        mode = "Message Batches, half price" if cfg.use_batches else "Messages API"
        return (
            f"explain: {self.requests} request(s) to {cfg.model} ({mode}); ~{self.input_tokens:,} input "
            f"tokens (approx., chars/{CHARS_PER_TOKEN}); estimated cost ~${self.typical_usd:,.2f} "
            f"(at most ${self.max_usd:,.2f} if every answer used max_tokens={cfg.max_tokens})"
        )


@dataclass(slots=True)
class ExplainSummary:
    """What a run did; `format()` is the printed summary."""

    output_path: str
    rows: int
    ok: int
    failed: int
    failed_by_reason: dict[str, int]
    unique_texts: int
    cache_hits: int
    requests_sent: int
    retries: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    estimated_cost_usd: float
    seconds: float

    def format(self) -> str:
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(self.failed_by_reason.items())) or "none"
        return "\n".join(
            [
                f"explain summary: {self.output_path}",
                f"  rows {self.rows}: ok {self.ok}, failed {self.failed} ({reasons})",
                f"  unique texts {self.unique_texts}: from cache {self.cache_hits}, "
                f"asked {self.unique_texts - self.cache_hits}",
                f"  requests sent {self.requests_sent} (retries {self.retries}); tokens in "
                f"{self.input_tokens:,}, out {self.output_tokens:,}",
                f"  cost ${self.cost_usd:,.4f} (estimated before the run ${self.estimated_cost_usd:,.4f}); "
                f"{self.seconds:.1f} s",
            ]
        )


@dataclass(slots=True)
class _Progress:
    """Answers of this run (key -> Answer) and what they cost."""

    answers: dict[str, Answer]
    fresh: list[Answer] = field(default_factory=list)
    stats: CallStats = field(default_factory=CallStats)


def run_explain(
    cfg: ExplainConfig, input_path: str | os.PathLike[str], output_path: str | os.PathLike[str]
) -> ExplainSummary:
    """Explain every row of `input_path`; write `output_path` (+ sidecar); return the summary."""
    started = time.monotonic()
    input_path, output_path = Path(input_path), Path(output_path)
    texts = read_texts(input_path)
    check_output_path(input_path, output_path)
    keys = [None if is_blank(t) else key_for(cfg, t) for t in texts]
    unique = {k: t for k, t in zip(keys, texts, strict=True) if k is not None}
    cache = AnswerCache(cfg.cache_dir)
    try:
        progress = _Progress(answers=cached_answers(cache, unique, cfg.retry_cached_failures))
        cache_hits = len(progress.answers)
        todo = {k: t for k, t in unique.items() if k not in progress.answers}
        estimate = estimate_cost(cfg, todo.values())
        log.info(estimate.format(cfg))
        check_budget(cfg, estimate)
        if todo:
            asyncio.run(explain_missing(cfg, todo, cache, progress, total=len(unique)))
    finally:
        cache.close()
    row_answers = [
        progress.answers.get(k) if k else Answer.failed("empty_text", cacheable=False) for k in keys
    ]
    write_output(input_path, output_path, row_answers)
    carry_sidecar(input_path, output_path, api_summaries(cfg))
    summary = summarize(
        cfg, output_path, row_answers, len(unique), cache_hits, progress, estimate, started
    )
    log.info(summary.format())
    return summary


def key_for(cfg: ExplainConfig, text: str) -> str:
    return cache_key(
        model_id=key_model(cfg),
        instruction_prompt=cfg.instruction_prompt,
        text=text,
        temperature=cfg.temperature,
        max_tokens=cfg.max_tokens,
        effort=cfg.effort,
    )


def cached_answers(
    cache: AnswerCache, unique: dict[str, str], retry_failures: bool
) -> dict[str, Answer]:
    found = cache.lookup(unique.keys())
    return {k: a for k, a in found.items() if a.ok or not retry_failures}


# --- cost -------------------------------------------------------------------------------------


def price_usd(cfg: ExplainConfig, input_tokens: int, output_tokens: int) -> float:
    if cfg.explainer is ExplainerKind.offline:
        return 0.0
    usd = (
        input_tokens * cfg.price_input_per_mtok + output_tokens * cfg.price_output_per_mtok
    ) / 1e6
    return usd * (0.5 if cfg.use_batches else 1.0)


def estimate_cost(cfg: ExplainConfig, texts: Iterable[str]) -> CostEstimate:
    prompt_chars = len(cfg.instruction_prompt) - len(TEXT_SLOT)
    lengths = [len(t) for t in texts]
    n = len(lengths)
    input_tokens = math.ceil((sum(lengths) + n * prompt_chars) / CHARS_PER_TOKEN)
    typical = price_usd(cfg, input_tokens, n * min(cfg.max_tokens, TYPICAL_OUTPUT_TOKENS))
    return CostEstimate(n, input_tokens, typical, price_usd(cfg, input_tokens, n * cfg.max_tokens))


def check_budget(cfg: ExplainConfig, estimate: CostEstimate) -> None:
    limit = cfg.max_estimated_cost_usd
    if limit is not None and estimate.typical_usd > limit:
        raise ExplainError(
            f"estimated cost ${estimate.typical_usd:,.2f} exceeds explain.max_estimated_cost_usd=${limit:,.2f}: "
            "raise the limit, use explain.use_batches=true (half price), or explain fewer rows"
        )


# --- asking -----------------------------------------------------------------------------------


async def explain_missing(
    cfg: ExplainConfig, todo: dict[str, str], cache: AnswerCache, progress: _Progress, *, total: int
) -> None:
    worker = make_worker(cfg)
    progress.stats = worker.stats
    bar = tqdm(
        total=total,
        initial=total - len(todo),
        unit="text",
        desc="explain",
        disable=not cfg.progress,
        dynamic_ncols=True,
    )

    def on_answer(key: str, answer: Answer) -> None:
        if answer.cacheable:
            cache.put(key, answer)
        if key in todo and key not in progress.answers:
            progress.answers[key] = answer
            progress.fresh.append(answer)
            bar.update(1)

    try:
        if cfg.use_batches:
            await worker.run(todo, on_answer)
        else:
            await explain_concurrently(worker, todo, cfg.concurrency, on_answer)
    finally:
        bar.close()
        await worker.aclose()


def make_worker(cfg: ExplainConfig) -> Explainer | BatchRunner:
    """The explainer (or batch runner) for `cfg`; imports the SDK only when it is used."""
    if cfg.explainer is ExplainerKind.offline:
        return OfflineExplainer()
    if cfg.use_batches:
        from nla_mcore.datagen.anthropic_batches import BatchRunner

        return BatchRunner(cfg)
    from nla_mcore.datagen.anthropic_explainer import AnthropicExplainer

    return AnthropicExplainer(cfg)


async def explain_concurrently(
    explainer: Explainer,
    todo: dict[str, str],
    concurrency: int,
    on_answer: Callable[[str, Answer], None],
) -> None:
    """`concurrency` workers pull from one shared iterator; the first run-stopping error cancels all."""
    items = iter(todo.items())

    async def work() -> None:
        for key, text in items:
            on_answer(key, await explainer.explain(text))

    tasks = [asyncio.ensure_future(work()) for _ in range(min(concurrency, len(todo)))]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        task.result()  # re-raises the first error


def api_summaries(cfg: ExplainConfig) -> dict:
    """The sidecar's record of how the explanations were made."""
    return {
        "model": key_model(cfg),
        "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
        "effort": cfg.effort,
        "instruction_prompt": cfg.instruction_prompt,
    }


def key_model(cfg: ExplainConfig) -> str:
    """The explainer's model id as it goes into cache keys and the sidecar."""
    return OFFLINE_MODEL_ID if cfg.explainer is ExplainerKind.offline else cfg.model


# --- summary ----------------------------------------------------------------------------------


def summarize(
    cfg: ExplainConfig,
    output_path: Path,
    row_answers: Sequence[Answer | None],
    unique_texts: int,
    cache_hits: int,
    progress: _Progress,
    estimate: CostEstimate,
    started: float,
) -> ExplainSummary:
    failures = Counter(a.failure if a else "no_answer" for a in row_answers if not (a and a.ok))
    input_tokens = sum(a.input_tokens for a in progress.fresh)
    output_tokens = sum(a.output_tokens for a in progress.fresh)
    return ExplainSummary(
        output_path=str(output_path),
        rows=len(row_answers),
        ok=len(row_answers) - sum(failures.values()),
        failed=sum(failures.values()),
        failed_by_reason=dict(failures),
        unique_texts=unique_texts,
        cache_hits=cache_hits,
        requests_sent=progress.stats.requests_sent,
        retries=progress.stats.retries,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost_usd=price_usd(cfg, input_tokens, output_tokens),
        estimated_cost_usd=estimate.typical_usd,
        seconds=time.monotonic() - started,
    )


# --- command line -----------------------------------------------------------------------------


def load_explain_config(config_path: str | None, overrides: Sequence[str]) -> ExplainConfig:
    """Defaults <- YAML (its `explain:` block, or the file itself) <- `key=value` overrides."""
    try:
        merged = OmegaConf.structured(ExplainConfig)
        if config_path:
            loaded = OmegaConf.load(config_path)
            merged = OmegaConf.merge(merged, loaded.get("explain", loaded))
        dotlist = [o.removeprefix("explain.") for o in overrides]
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(dotlist))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ValueError(f"bad explain config: {err}") from err


def main_explain(argv: Sequence[str] | None = None) -> int:
    """`nla-mcore datagen explain --input IN --output OUT [--config C] [key=value ...]`."""
    parser = argparse.ArgumentParser(
        prog="nla-mcore datagen explain", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--input", required=True, help="activation parquet")
    parser.add_argument(
        "--output", required=True, help="output parquet (input columns + explanations)"
    )
    parser.add_argument(
        "--config", help="YAML with an `explain:` block (or the explain fields at top level)"
    )
    parser.add_argument(
        "overrides", nargs="*", help="ExplainConfig fields as key=value (explain. prefix optional)"
    )
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        logging.getLogger("httpx2").setLevel(logging.WARNING)  # one INFO line per request otherwise
    try:
        run_explain(load_explain_config(args.config, args.overrides), args.input, args.output)
    except (ExplainError, FileNotFoundError, ValueError) as err:
        print(f"nla-mcore datagen explain: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main_explain())
