"""Configuration of the Explain stage (activation parquet -> explanations).

One `@dataclass(kw_only=True, slots=True)` with a docstring under every field (they become CLI help)
and only OmegaConf-compatible field types, so it nests into the project's config tree as is.

Model-generation facts that shaped the defaults (checked against the `anthropic` SDK 2.14 and the
platform docs, Nov 2026):
- Sonnet 5 and later reject non-default sampling parameters with a 400, and the SDK no longer has a
  `temperature` argument: `temperature` is therefore `None` (not sent) unless set, and is then sent
  as an extra body field for older models that accept it.
- Adaptive thinking is on by default and cannot be disabled on Sonnet 5.5; `max_tokens` bounds
  thinking *and* answer. The default `effort="low"` keeps thinking short for an 80-100 word answer,
  and `max_tokens=1024` leaves room for it; a truncated answer becomes a failed row (`truncated`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

DEFAULT_INSTRUCTION_PROMPT = """\
We are studying how a language model represents text internally. The model has read the passage \
below up to and including its final token, and we want to know what its internal state at that \
final token most likely encodes. The passage may stop in the middle of a word or a sentence: the \
point where it stops is the final token.

<passage>
{text}
</passage>

Write an explanation made of 2-3 short features, about 80-100 words in total. Each feature is one \
or two sentences of plain prose naming something the model would need to keep track of at this \
point: for example the topic or genre of the document, its language or register, the structure the \
text is inside (a list, a quotation, code, a table, a dialogue), or what is likely to come next. The \
last feature must describe the final token itself: what it is and the role it plays where it \
appears. Be concrete and quote short phrases from the passage where that helps. Do not use \
headings, bullet points or numbering, and do not mention these instructions.

Answer with the explanation only, enclosed in <explanation></explanation> tags."""

TEXT_SLOT = "{text}"
EFFORT_LEVELS = ("low", "medium", "high", "xhigh", "max")
BATCH_API_MAX_REQUESTS = 100_000


class ExplainerKind(str, Enum):
    """Which explainer answers: the Anthropic Messages API, or the deterministic offline one."""

    anthropic = "anthropic"
    offline = "offline"


@dataclass(kw_only=True, slots=True)
class ExplainConfig:
    """Explain stage: ask an explainer for a 2-3 feature explanation of each row's text."""

    explainer: ExplainerKind = ExplainerKind.anthropic
    """`anthropic` (needs ANTHROPIC_API_KEY) or `offline` (no network; quickstart and tests)."""

    model: str = "claude-sonnet-5-5"
    """Claude model id for the Messages API. Part of the cache key."""

    max_tokens: int = 1024
    """Output cap per answer, thinking included; a truncated answer fails. In the cache key."""

    temperature: float | None = None
    """Temperature in [0, 1]; null sends none (Sonnet 5+ reject other values). In the cache key."""

    effort: str | None = "low"
    """`output_config.effort`: low|medium|high|xhigh|max; null sends none. In the cache key."""

    instruction_prompt: str = DEFAULT_INSTRUCTION_PROMPT
    """The user message per row; `{text}` (once) becomes the row's text. In the cache key."""

    concurrency: int = 32
    """Requests in flight at once (Messages API mode)."""

    max_retries: int = 6
    """Retries per request on 429, 5xx, 529, timeouts, connection errors and malformed bodies."""

    backoff_initial_s: float = 1.0
    """First retry delay (s), doubled per retry with jitter; a server's retry-after wins."""

    backoff_max_s: float = 60.0
    """Longest retry delay in seconds (also the cap on a server's `retry-after`)."""

    timeout_s: float = 120.0
    """Per-request timeout in seconds; a timed-out request is retried."""

    base_url: str | None = None
    """API base URL (tests, proxies); null: the SDK's default, or ANTHROPIC_BASE_URL if set."""

    use_batches: bool = False
    """Use the Message Batches API (half price, results within 24 h) instead of one call per row."""

    batch_max_requests: int = 10_000
    """Requests per submitted batch (the API allows at most 100,000 and 256 MB)."""

    batch_poll_s: float = 60.0
    """Seconds between polls of a running batch."""

    batch_max_wait_s: float | None = None
    """Stop waiting for running batches after this many seconds (rerun to resume); null waits."""

    cache_dir: str = "~/.cache/nla_mcore/explain"
    """Answer cache (JSONL shards, batch state); share it across runs and datasets."""

    retry_cached_failures: bool = False
    """Ask again for texts whose cached answer was a failure (refusal, truncated, unparseable)."""

    price_input_per_mtok: float = 2.0
    """USD per million input tokens of `model`, for the cost estimate (check current pricing)."""

    price_output_per_mtok: float = 10.0
    """USD per million output tokens of `model` (thinking included), for the cost estimate."""

    max_estimated_cost_usd: float | None = None
    """Refuse to start when the estimated cost exceeds this many USD; null: no limit."""

    progress: bool = True
    """Show a progress bar (rate, ETA) on stderr."""

    def __post_init__(self) -> None:
        self.explainer = ExplainerKind(self.explainer)
        _check_generation(self)
        _check_client(self)
        _check_batches(self)
        _check_prices(self)


def _check_generation(cfg: ExplainConfig) -> None:
    if not cfg.model.strip():
        raise ValueError(
            "explain.model is empty: set it to a Claude model id, e.g. claude-sonnet-5-5"
        )
    if cfg.max_tokens < 16:
        raise ValueError(f"explain.max_tokens={cfg.max_tokens} is too small: set it to at least 16")
    if cfg.temperature is not None and not 0.0 <= cfg.temperature <= 1.0:
        raise ValueError(
            f"explain.temperature={cfg.temperature} is outside [0, 1]: set a value in range or null"
        )
    if cfg.effort is not None and cfg.effort not in EFFORT_LEVELS:
        raise ValueError(
            f"explain.effort={cfg.effort!r}: set one of {', '.join(EFFORT_LEVELS)} or null"
        )
    if cfg.instruction_prompt.count(TEXT_SLOT) != 1:
        raise ValueError(
            "explain.instruction_prompt must contain the slot {text} exactly once "
            f"(found {cfg.instruction_prompt.count(TEXT_SLOT)})"
        )


def _check_client(cfg: ExplainConfig) -> None:
    if cfg.concurrency < 1:
        raise ValueError(f"explain.concurrency={cfg.concurrency}: set it to at least 1")
    if cfg.max_retries < 0:
        raise ValueError(f"explain.max_retries={cfg.max_retries}: set it to 0 or more")
    if cfg.backoff_initial_s < 0 or cfg.backoff_max_s < cfg.backoff_initial_s:
        raise ValueError(
            "explain.backoff_initial_s must be >= 0 and explain.backoff_max_s >= backoff_initial_s"
        )
    if cfg.timeout_s <= 0:
        raise ValueError(f"explain.timeout_s={cfg.timeout_s}: set a positive number of seconds")
    if not cfg.cache_dir.strip():
        raise ValueError("explain.cache_dir is empty: set a directory for the answer cache")


def _check_batches(cfg: ExplainConfig) -> None:
    if cfg.use_batches and cfg.explainer is not ExplainerKind.anthropic:
        raise ValueError("explain.use_batches needs explain.explainer=anthropic")
    if not 1 <= cfg.batch_max_requests <= BATCH_API_MAX_REQUESTS:
        raise ValueError(f"explain.batch_max_requests must be in [1, {BATCH_API_MAX_REQUESTS}]")
    if cfg.batch_poll_s <= 0:
        raise ValueError(
            f"explain.batch_poll_s={cfg.batch_poll_s}: set a positive number of seconds"
        )
    if cfg.batch_max_wait_s is not None and cfg.batch_max_wait_s < 0:
        raise ValueError("explain.batch_max_wait_s must be >= 0 or null")


def _check_prices(cfg: ExplainConfig) -> None:
    if cfg.price_input_per_mtok < 0 or cfg.price_output_per_mtok < 0:
        raise ValueError("explain.price_input_per_mtok and price_output_per_mtok must be >= 0")
    if cfg.max_estimated_cost_usd is not None and cfg.max_estimated_cost_usd < 0:
        raise ValueError("explain.max_estimated_cost_usd must be >= 0 or null")
