"""Message Batches mode: submit the missing texts as batches (half price), poll, collect.

Decisions:
- `custom_id` is the answer's cache key (a 64-char sha256 hex digest, the API's maximum length),
  so results map back to texts with no side table and land in the same answer cache.
- Resume: every submitted batch is appended to `<cache_dir>/batches.jsonl` (batch id + its keys)
  right after `create` returns, and a `collected` line is appended once its results are cached.
  A restarted run first waits for the open batches that hold any of its texts, then submits only
  texts that are neither cached nor in an open batch. A kill between `create` returning and that
  line being written loses the batch id (its results are then paid for twice); the window is one
  local file append.
- No resubmission rounds: a result that is not a message (`errored`, `expired`, `canceled`) is a
  failed row that is not cached, so the next run submits it again.
- `batch_max_wait_s` bounds the wait; the run then stops with the batch ids, and rerunning resumes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from nla_mcore.datagen.anthropic_explainer import (
    CallFailed,
    MalformedResponse,
    answer_from_message,
    call_with_retries,
    check_message,
    make_client,
    read_api_key,
    request_body,
)
from nla_mcore.datagen.explain_config import ExplainConfig
from nla_mcore.datagen.explainers import Answer, CallStats, ExplainError

log = logging.getLogger(__name__)

OnAnswer = Callable[[str, Answer], None]
STATE_FILE = "batches.jsonl"
_ERROR_REASONS = {"invalid_request_error": "invalid_request"}


class BatchState:
    """Append-only log of submitted and collected batches (crash-safe like the answer cache)."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory).expanduser() / STATE_FILE

    def open_batches(self) -> dict[str, list[str]]:
        submitted: dict[str, list[str]] = {}
        collected: set[str] = set()
        for event in self._events():
            if event.get("event") == "submitted":
                submitted[event["batch_id"]] = list(event.get("keys", []))
            elif event.get("event") == "collected":
                collected.add(event["batch_id"])
        return {bid: keys for bid, keys in submitted.items() if bid not in collected}

    def record_submitted(self, batch_id: str, keys: list[str]) -> None:
        self._append({"event": "submitted", "batch_id": batch_id, "keys": keys})

    def record_collected(self, batch_id: str) -> None:
        self._append({"event": "collected", "batch_id": batch_id})

    def _append(self, event: dict) -> None:
        event["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(event) + "\n")

    def _events(self) -> Iterator[dict]:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                if not line.endswith("\n"):
                    continue  # partial last line of a killed run
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(event, dict) and isinstance(event.get("batch_id"), str):
                    yield event


class BatchRunner:
    """Runs the batches for one stage invocation; `stats` counts HTTP requests like the explainer."""

    def __init__(self, cfg: ExplainConfig) -> None:
        self.cfg = cfg
        self.stats = CallStats()
        self.state = BatchState(Path(cfg.cache_dir))
        self._secret = read_api_key()
        self._client = make_client(cfg, self._secret)

    async def run(self, todo: dict[str, str], on_answer: OnAnswer) -> None:
        """Answer every key of `todo` (key -> text) through `on_answer`; resume open batches first."""
        waiting = {
            bid: keys
            for bid, keys in self.state.open_batches().items()
            if not todo.keys().isdisjoint(keys)
        }
        if waiting:
            log.info("resuming %d open batch(es): %s", len(waiting), ", ".join(waiting))
        covered = {key for keys in waiting.values() for key in keys}
        missing = [key for key in todo if key not in covered]
        for start in range(0, len(missing), self.cfg.batch_max_requests):
            chunk = missing[start : start + self.cfg.batch_max_requests]
            waiting[await self._submit(chunk, todo)] = chunk
        await self._wait_and_collect(waiting, on_answer)

    async def aclose(self) -> None:
        await self._client.close()

    async def _submit(self, keys: list[str], todo: dict[str, str]) -> str:
        requests = [{"custom_id": key, "params": request_body(self.cfg, todo[key])} for key in keys]
        batch = await self._retrying(
            "create", lambda: self._client.messages.batches.create(requests=requests)
        )
        self.state.record_submitted(batch.id, keys)
        log.info("submitted batch %s with %d request(s)", batch.id, len(keys))
        return batch.id

    async def _wait_and_collect(self, waiting: dict[str, list[str]], on_answer: OnAnswer) -> None:
        deadline = (
            None
            if self.cfg.batch_max_wait_s is None
            else time.monotonic() + self.cfg.batch_max_wait_s
        )
        while waiting:
            for batch_id in list(waiting):
                batch = await self._retrying(
                    "retrieve", lambda b=batch_id: self._client.messages.batches.retrieve(b)
                )
                if batch.processing_status == "ended":
                    await self._collect(batch, waiting.pop(batch_id), on_answer)
                else:
                    log.info("batch %s %s: %s", batch_id, batch.processing_status, _counts(batch))
            if waiting and deadline is not None and time.monotonic() >= deadline:
                raise ExplainError(
                    f"{len(waiting)} batch(es) still running after {self.cfg.batch_max_wait_s} s "
                    f"({', '.join(waiting)}): rerun the same command to resume them "
                    f"(their ids are kept in {self.state.path})"
                )
            if waiting:
                await asyncio.sleep(self.cfg.batch_poll_s)

    async def _collect(self, batch: Any, keys: list[str], on_answer: OnAnswer) -> None:
        results = (
            []
            if not batch.results_url
            else await self._retrying("results", lambda: self._read_results(batch.id))
        )
        seen = set()
        for item in results:
            seen.add(item.custom_id)
            on_answer(item.custom_id, answer_from_result(item.result))
        for key in keys:
            if key not in seen:
                on_answer(key, Answer.failed("batch_missing_result", cacheable=False))
        self.state.record_collected(batch.id)
        log.info(
            "collected batch %s: %d result(s) for %d request(s)", batch.id, len(seen), len(keys)
        )

    async def _read_results(self, batch_id: str) -> list[Any]:
        stream = await self._client.messages.batches.results(batch_id)
        return [item async for item in stream]

    async def _retrying(self, what: str, call: Callable[[], Any]) -> Any:
        try:
            return await call_with_retries(call, self.cfg, self.stats, self._secret)
        except CallFailed as failed:
            raise ExplainError(
                f"message batch {what} failed ({failed.problem.reason}: {failed.problem.detail}); "
                f"rerun to resume (open batches are kept in {self.state.path})"
            ) from None


def _counts(batch: Any) -> str:
    counts = batch.request_counts
    names = ("processing", "succeeded", "errored", "expired", "canceled")
    return ", ".join(f"{name} {getattr(counts, name, '?')}" for name in names)


def answer_from_result(result: Any) -> Answer:
    """One batch result -> an Answer; only `succeeded` results can be cached."""
    kind = getattr(result, "type", None)
    if kind == "succeeded":
        message = getattr(result, "message", None)
        try:
            check_message(message)
        except MalformedResponse:
            return Answer.failed("malformed_response", cacheable=False)
        return answer_from_message(message)
    if kind == "errored":
        error_type = getattr(getattr(getattr(result, "error", None), "error", None), "type", None)
        return Answer.failed(_ERROR_REASONS.get(str(error_type), "batch_errored"), cacheable=False)
    if kind in ("expired", "canceled"):
        return Answer.failed(f"batch_{kind}", cacheable=False)
    return Answer.failed("malformed_response", cacheable=False)
