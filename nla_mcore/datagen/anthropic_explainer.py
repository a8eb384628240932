"""The Anthropic Messages API explainer: one request per text, retried with backoff.

Decisions:
- The SDK's own retries are off (`max_retries=0`) and this module retries instead, so that the
  backoff is configurable (tests run with millisecond delays), retries are counted in the run
  summary, and a malformed 200 body (which the SDK does not retry) is retried like a 5xx.
  A server's `retry-after-ms` / `retry-after` header wins over the computed backoff, capped at
  `backoff_max_s`.
- Outcome per error: 429 `rate_limited`, 529 `overloaded`, other 5xx `server_error`, timeouts and
  connection errors, malformed bodies: retried, then a failed row (not cached). 400/413/422
  `invalid_request`: a failed row at once. 401/403/404: the run stops (`ExplainError`), because
  every other request would fail the same way.
- The key comes from `ANTHROPIC_API_KEY` only and is passed explicitly to the client (so no other
  credential source of the SDK is consulted). It is never logged or stored: error details are
  built from the status code and the server's error message, never from the SDK exception's text
  or the request, and are scrubbed of the key in case a proxy echoes it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anthropic

from nla_mcore.datagen.explain_config import ExplainConfig
from nla_mcore.datagen.explainers import (
    Answer,
    CallStats,
    ExplainError,
    answer_from_completion,
    build_user_message,
)

log = logging.getLogger(__name__)

API_KEY_ENV = "ANTHROPIC_API_KEY"
_DETAIL_CHARS = 300
T = TypeVar("T")


class MalformedResponse(Exception):
    """A 2xx body that is not a Message (bad JSON, missing fields)."""


@dataclass(frozen=True, slots=True)
class CallProblem:
    """What went wrong with one attempt, and what to do about it."""

    reason: str
    retryable: bool = False
    fatal: bool = False
    detail: str = ""
    retry_after_s: float | None = None


class CallFailed(Exception):
    """Retries exhausted, or an error that retrying cannot fix; the row fails with `problem.reason`."""

    def __init__(self, problem: CallProblem) -> None:
        super().__init__(f"{problem.reason}: {problem.detail}")
        self.problem = problem


def read_api_key() -> str:
    key = os.environ.get(API_KEY_ENV, "").strip()
    if not key:
        raise ExplainError(
            f"{API_KEY_ENV} is not set: export it to use the Anthropic API, "
            "or set explain.explainer=offline for a run without it"
        )
    return key


def make_client(cfg: ExplainConfig, api_key: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        api_key=api_key, base_url=cfg.base_url, timeout=cfg.timeout_s, max_retries=0
    )


def request_body(cfg: ExplainConfig, text: str) -> dict[str, Any]:
    """The Messages API request for one text (also a batch request's `params`)."""
    body: dict[str, Any] = {
        "model": cfg.model,
        "max_tokens": cfg.max_tokens,
        "messages": [{"role": "user", "content": build_user_message(cfg.instruction_prompt, text)}],
    }
    if cfg.effort is not None:
        body["output_config"] = {"effort": cfg.effort}
    if cfg.temperature is not None:
        body["temperature"] = cfg.temperature
    return body


def redact(text: str, secret: str) -> str:
    return text.replace(secret, "[redacted]") if secret else text


# --- error classification and retries -----------------------------------------------------------


def classify_error(err: Exception, secret: str) -> CallProblem:
    if isinstance(err, anthropic.APITimeoutError):
        return CallProblem("timeout", retryable=True, detail="request timed out")
    if isinstance(err, anthropic.APIConnectionError):
        return CallProblem("connection_error", retryable=True, detail="connection failed")
    if isinstance(err, anthropic.APIStatusError):
        return _classify_status(err, secret)
    if isinstance(
        err, (MalformedResponse, anthropic.APIResponseValidationError, json.JSONDecodeError)
    ):
        return CallProblem("malformed_response", retryable=True, detail=f"{type(err).__name__}")
    return CallProblem("api_error", detail=type(err).__name__)


def _classify_status(err: anthropic.APIStatusError, secret: str) -> CallProblem:
    status = err.status_code
    detail = redact(f"HTTP {status} {err.type or ''}: {err.api_message or ''}", secret)[
        :_DETAIL_CHARS
    ]
    retry_after = _retry_after_s(err.response.headers)
    if status in (401, 403):
        return CallProblem(
            "auth", fatal=True, detail=f"{detail} (check {API_KEY_ENV} and its workspace)"
        )
    if status == 404:
        return CallProblem(
            "not_found", fatal=True, detail=f"{detail} (check explain.model and explain.base_url)"
        )
    if status == 429:
        return CallProblem("rate_limited", retryable=True, detail=detail, retry_after_s=retry_after)
    if status == 529:
        return CallProblem("overloaded", retryable=True, detail=detail, retry_after_s=retry_after)
    if status in (408, 409) or status >= 500:
        return CallProblem("server_error", retryable=True, detail=detail, retry_after_s=retry_after)
    if status in (400, 413, 422):
        return CallProblem("invalid_request", detail=detail)
    return CallProblem(f"http_{status}", detail=detail)


def _retry_after_s(headers) -> float | None:
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            continue  # an HTTP date: fall back to our own backoff
    return None


def backoff_s(cfg: ExplainConfig, retry: int, problem: CallProblem) -> float:
    if problem.retry_after_s is not None:
        return min(problem.retry_after_s, cfg.backoff_max_s)
    delay = min(cfg.backoff_max_s, cfg.backoff_initial_s * 2.0**retry)
    return delay * (1.0 - 0.25 * random.random())


async def call_with_retries(
    call: Callable[[], Awaitable[T]], cfg: ExplainConfig, stats: CallStats, secret: str
) -> T:
    """Run `call` until it succeeds; raise `CallFailed`, or `ExplainError` for run-stopping errors."""
    for retry in range(cfg.max_retries + 1):
        stats.requests_sent += 1
        try:
            return await call()
        except (anthropic.APIError, MalformedResponse, json.JSONDecodeError) as err:
            problem = classify_error(err, secret)
        if problem.fatal:
            raise ExplainError(f"the Anthropic API refused the run: {problem.detail}") from None
        if not problem.retryable or retry == cfg.max_retries:
            raise CallFailed(problem)
        delay = backoff_s(cfg, retry, problem)
        log.debug("retrying after %s (%s) in %.2f s", problem.reason, problem.detail, delay)
        stats.retries += 1
        await asyncio.sleep(delay)
    raise AssertionError("unreachable: the loop returns or raises")


# --- responses ----------------------------------------------------------------------------------


def check_message(message: object) -> None:
    """Raise `MalformedResponse` unless `message` looks like a Messages API `Message`."""
    content = getattr(message, "content", None)
    if not isinstance(content, list) or not hasattr(message, "stop_reason"):
        raise MalformedResponse(f"not a Message: {type(message).__name__}")


def answer_from_message(message: Any) -> Answer:
    """Text blocks only (thinking blocks come first on models with adaptive thinking)."""
    raw = "".join(
        getattr(b, "text", "") or "" for b in message.content if getattr(b, "type", None) == "text"
    )
    usage = getattr(message, "usage", None)
    return answer_from_completion(
        raw,
        message.stop_reason,
        input_tokens=int(getattr(usage, "input_tokens", 0) or 0),
        output_tokens=int(getattr(usage, "output_tokens", 0) or 0),
    )


class AnthropicExplainer:
    """One Messages API request per text, through the official async SDK."""

    def __init__(self, cfg: ExplainConfig) -> None:
        self.cfg = cfg
        self.model_id = cfg.model
        self.stats = CallStats()
        self._secret = read_api_key()
        self._client = make_client(cfg, self._secret)
        self._reported: set[str] = set()

    async def explain(self, text: str) -> Answer:
        body = request_body(self.cfg, text)
        try:
            message = await call_with_retries(
                lambda: self._create(body), self.cfg, self.stats, self._secret
            )
        except CallFailed as failed:
            self._report_first(failed.problem)
            return Answer.failed(failed.problem.reason, cacheable=False)
        return answer_from_message(message)

    async def aclose(self) -> None:
        await self._client.close()

    async def _create(self, body: dict[str, Any]) -> Any:
        body = dict(body)
        extra = {"temperature": body.pop("temperature")} if "temperature" in body else None
        message = await self._client.messages.create(**body, extra_body=extra)
        check_message(message)
        return message

    def _report_first(self, problem: CallProblem) -> None:
        """Log the first failure of each kind with its detail; the summary counts the rest."""
        if problem.reason not in self._reported:
            self._reported.add(problem.reason)
            log.warning(
                "request failed (%s): %s; further ones are counted in the summary",
                problem.reason,
                problem.detail,
            )
