"""A local HTTP server that speaks enough of the Anthropic Messages API for the real SDK.

Endpoints: `POST /v1/messages`, `POST /v1/messages/batches`, `GET /v1/messages/batches/{id}`,
`GET /v1/messages/batches/{id}/results` (JSONL). Response bodies have the real shapes (id, type,
role, content blocks with a thinking block before the text as adaptive-thinking models send,
model, stop_reason, usage; batch objects with request_counts and results_url).

Faults are scripted per text, not per request order, so they are deterministic under any
concurrency: `faults={"row-7 ": ["429", "500"]}` makes the first two requests whose prompt contains
`"row-7 "` fail with those faults, and later ones succeed. Faults:

| fault | Messages API | in a batch |
|---|---|---|
| `429` | 429 rate_limit_error with `retry-after-ms` | errored (rate_limit_error) |
| `500`, `529` | api_error, overloaded_error | errored |
| `400` | invalid_request_error | errored (invalid_request_error) |
| `401` | authentication_error | errored |
| `timeout` | answers after `slow_s` (longer than the client's timeout) | - |
| `malformed` | 200 with a truncated JSON body | - |
| `echo_key` | 500 whose error message contains the request's API key (a leaky proxy) | - |
| `refusal`, `no_tags`, `truncated`, `empty` | 200 with stop_reason refusal / an answer without tags / stop_reason max_tokens / empty tags | succeeded, same message |
| `expired` | - | expired |

Every request is recorded (method, path, headers, JSON body) for assertions, including the
credential headers, so tests can check the key was sent (and then that it appears nowhere else).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_PASSAGE_RE = re.compile(r"<passage>\n(.*)\n</passage>", re.DOTALL)
_ERROR_TYPES = {
    "429": (429, "rate_limit_error", "Number of request tokens has exceeded your rate limit"),
    "500": (500, "api_error", "Internal server error"),
    "529": (529, "overloaded_error", "Overloaded"),
    "400": (400, "invalid_request_error", "prompt is too long"),
    "401": (401, "authentication_error", "invalid x-api-key"),
}


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: object
    time: float

    @property
    def prompt(self) -> str:
        """The user message of a Messages API request ('' for other requests)."""
        try:
            return self.body["messages"][0]["content"]
        except (TypeError, KeyError, IndexError):
            return ""


def passage_of(prompt: str) -> str:
    match = _PASSAGE_RE.search(prompt)
    return match.group(1) if match else prompt


def normal_answer(prompt: str) -> str:
    """Deterministic for a prompt, and it names the passage's last word, so tests can check rows."""
    words = passage_of(prompt).split() or ["nothing"]
    digest = hashlib.sha256(prompt.encode()).hexdigest()[:8]
    return (
        f'<explanation>\nThe passage opens with "{words[0]}" and is a short test document ({digest}). '
        f'The final token is "{words[-1]}".\n</explanation>'
    )


def message_body(prompt: str, model: str, fault: str | None) -> dict:
    text, stop = normal_answer(prompt), "end_turn"
    if fault == "refusal":
        text, stop = "", "refusal"
    elif fault == "no_tags":
        text = "The passage is about testing, but I forgot the tags."
    elif fault == "truncated":
        text, stop = "<explanation>\nThe passage opens with", "max_tokens"
    elif fault == "empty":
        text = "<explanation>\n   \n</explanation>"
    content = [{"type": "thinking", "thinking": "", "signature": "c2ln"}]
    if text:
        content.append({"type": "text", "text": text})
    return {
        "id": f"msg_{hashlib.sha256((prompt + str(fault)).encode()).hexdigest()[:24]}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {
            "input_tokens": max(1, len(prompt) // 4),
            "output_tokens": max(1, len(text) // 4),
        },
    }


def error_body(kind: str, message: str) -> dict:
    return {"type": "error", "error": {"type": kind, "message": message}}


class FakeAnthropic:
    """Start with `with FakeAnthropic(api_key=...) as fake:`; point the SDK at `fake.base_url`."""

    def __init__(
        self,
        *,
        api_key: str,
        faults: dict[str, list[str]] | None = None,
        delay_s: float = 0.0,
        slow_s: float = 1.5,
        batch_polls_in_progress: int = 1,
    ) -> None:
        self.api_key = api_key
        self.faults = {marker: list(queue) for marker, queue in (faults or {}).items()}
        self.delay_s = delay_s
        self.slow_s = slow_s
        self.batch_polls_in_progress = batch_polls_in_progress
        self.hold_batches = threading.Event()
        self.requests: list[Recorded] = []
        self.batches: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeAnthropic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # --- what the tests look at -----------------------------------------------------------

    def message_requests(self) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.method == "POST" and r.path == "/v1/messages"]

    def batch_creates(self) -> list[Recorded]:
        with self._lock:
            return [
                r for r in self.requests if r.method == "POST" and r.path == "/v1/messages/batches"
            ]

    # --- request handling (server threads) ------------------------------------------------

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        body = self._read_json(handler)
        record = Recorded(
            handler.command,
            handler.path,
            {k.lower(): v for k, v in handler.headers.items()},
            body,
            time.time(),
        )
        with self._lock:
            self.requests.append(record)
        if not self._authorized(record.headers):
            return _send(handler, 401, error_body("authentication_error", "invalid x-api-key"))
        route = (handler.command, handler.path)
        if route == ("POST", "/v1/messages"):
            return self._messages(handler, record)
        if route == ("POST", "/v1/messages/batches"):
            return self._create_batch(handler, body)
        match = re.fullmatch(r"/v1/messages/batches/([\w-]+)(/results)?", handler.path)
        if handler.command == "GET" and match:
            return self._batch_get(handler, match.group(1), bool(match.group(2)))
        return _send(
            handler,
            404,
            error_body("not_found_error", f"no route {handler.command} {handler.path}"),
        )

    def _authorized(self, headers: dict[str, str]) -> bool:
        return (
            headers.get("x-api-key") == self.api_key
            or headers.get("authorization") == f"Bearer {self.api_key}"
        )

    @staticmethod
    def _read_json(handler: BaseHTTPRequestHandler) -> object:
        length = int(handler.headers.get("content-length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            return json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return raw.decode("utf-8", "replace")

    def _next_fault(self, prompt: str) -> str | None:
        with self._lock:
            for marker, queue in self.faults.items():
                if marker in prompt and queue:
                    return queue.pop(0)
        return None

    def _messages(self, handler: BaseHTTPRequestHandler, record: Recorded) -> None:
        fault = self._next_fault(record.prompt)
        time.sleep(self.slow_s if fault == "timeout" else self.delay_s)
        if fault in _ERROR_TYPES:
            status, kind, message = _ERROR_TYPES[fault]
            return _send(handler, status, error_body(kind, message), {"retry-after-ms": "10"})
        if fault == "echo_key":
            return _send(
                handler,
                500,
                error_body("api_error", f"upstream rejected {record.headers.get('authorization')}"),
            )
        if fault == "malformed":
            return _send_raw(handler, 200, b'{"id": "msg_trunc", "type": "mess')
        return _send(
            handler, 200, message_body(record.prompt, record.body.get("model", "?"), fault)
        )

    def _create_batch(self, handler: BaseHTTPRequestHandler, body: dict) -> None:
        with self._lock:
            batch_id = f"msgbatch_{len(self.batches):04d}"
        results = [self._batch_result(r) for r in body["requests"]]
        batch = {"id": batch_id, "results": results, "polls": 0}
        with self._lock:
            self.batches[batch_id] = batch
        return _send(handler, 200, self._batch_object(batch, ended=False))

    def _batch_result(self, request: dict) -> dict:
        params = request["params"]
        prompt = params["messages"][0]["content"]
        fault = self._next_fault(prompt)
        if fault in _ERROR_TYPES:
            _, kind, message = _ERROR_TYPES[fault]
            result = {
                "type": "errored",
                "error": {"type": "error", "error": {"type": kind, "message": message}},
            }
        elif fault == "expired":
            result = {"type": "expired"}
        else:
            result = {"type": "succeeded", "message": message_body(prompt, params["model"], fault)}
        return {"custom_id": request["custom_id"], "result": result}

    def _batch_get(self, handler: BaseHTTPRequestHandler, batch_id: str, results: bool) -> None:
        with self._lock:
            batch = self.batches.get(batch_id)
        if batch is None:
            return _send(handler, 404, error_body("not_found_error", f"no batch {batch_id}"))
        if results:
            # reversed: results are not promised in request order, the client must map by custom_id
            lines = "".join(json.dumps(r) + "\n" for r in reversed(batch["results"])).encode()
            return _send_raw(handler, 200, lines, content_type="application/binary")
        batch["polls"] += 1
        ended = not self.hold_batches.is_set() and batch["polls"] > self.batch_polls_in_progress
        return _send(handler, 200, self._batch_object(batch, ended=ended))

    def _batch_object(self, batch: dict, *, ended: bool) -> dict:
        kinds = [r["result"]["type"] for r in batch["results"]]
        counts = {
            k: (kinds.count(k) if ended else 0)
            for k in ("succeeded", "errored", "canceled", "expired")
        }
        counts["processing"] = 0 if ended else len(kinds)
        stamp = "2026-11-25T00:00:00Z"
        return {
            "id": batch["id"],
            "type": "message_batch",
            "processing_status": "ended" if ended else "in_progress",
            "request_counts": counts,
            "created_at": stamp,
            "expires_at": "2026-11-26T00:00:00Z",
            "ended_at": stamp if ended else None,
            "cancel_initiated_at": None,
            "archived_at": None,
            "results_url": f"{self.base_url}/v1/messages/batches/{batch['id']}/results"
            if ended
            else None,
        }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default backlog of 5 refuses connections under concurrency 32
    fake: FakeAnthropic


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.fake.handle(self)

    def do_POST(self) -> None:  # noqa: N802
        self.server.fake.handle(self)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        return None  # keep test output clean


def _send(
    handler: BaseHTTPRequestHandler, status: int, body: dict, headers: dict[str, str] | None = None
) -> None:
    _send_raw(handler, status, json.dumps(body).encode(), headers=headers)


def _send_raw(
    handler: BaseHTTPRequestHandler,
    status: int,
    payload: bytes,
    headers: dict[str, str] | None = None,
    content_type: str = "application/json",
) -> None:
    try:
        handler.send_response(status)
        handler.send_header("content-type", content_type)
        handler.send_header("content-length", str(len(payload)))
        handler.send_header("request-id", f"req_{time.monotonic_ns()}")
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(payload)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the client timed out and hung up: exactly what the `timeout` fault is for
