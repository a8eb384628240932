"""Content-addressed answer cache: append-only JSONL shards in one directory.

Key = sha256 of the canonical JSON of everything that determines an answer: the explainer's model
id, the instruction prompt, the text, temperature, max_tokens and effort. Not the base model, the
layer or the dataset: a run for another dataset or another base model that shares texts reuses the
answers, and a re-run of a killed job asks only for what is missing (this *is* the crash-resume).

Storage decisions:
- each process appends to its own shard `answers-<utc>-<pid>-<rand>.jsonl`, one JSON object per
  line, flushed per answer. No locks; no two writers share a file, so it is safe on network
  filesystems, and caches from several machines merge by copying the shards into one directory.
- `kill -9` mid-write leaves at most a partial last line; the reader skips any line that is not a
  complete JSON object (and counts it), so a crash loses at most the answer being written. Lines
  are flushed to the OS, not fsynced: a machine crash can lose the last seconds of answers, which a
  re-run asks for again.
- reading scans every shard once and keeps only the keys the run asks for: O(cache size) at
  start, memory proportional to the run. Trade-off against sqlite: no index, but no locking
  trouble on NFS, and the files are plain text to inspect or merge.
- several records for one key (two runs raced, or a failure was asked again): an ok record wins,
  else the first one read.
The cache never holds the API key or request headers: records are built field by field below.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Collection
from pathlib import Path
from typing import IO

from nla_mcore.datagen.explainers import Answer

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
SHARD_GLOB = "answers-*.jsonl"


def cache_key(
    *,
    model_id: str,
    instruction_prompt: str,
    text: str,
    temperature: float | None,
    max_tokens: int,
    effort: str | None,
) -> str:
    """sha256 hex digest (64 chars) naming one answer; also used as the batch `custom_id`."""
    payload = {
        "format": CACHE_FORMAT,
        "model": model_id,
        "prompt": instruction_prompt,
        "text": text,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "effort": effort,
    }
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class AnswerCache:
    """Look answers up by key; append new ones to this process's shard."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.skipped_lines = 0
        self._shard: IO[str] | None = None

    def lookup(self, keys: Collection[str]) -> dict[str, Answer]:
        wanted = set(keys)
        found: dict[str, Answer] = {}
        for shard in sorted(self.directory.glob(SHARD_GLOB)):
            for record in self._read_records(shard):
                key = record.get("key")
                if key in wanted and (key not in found or not found[key].ok):
                    found[key] = _answer_from_record(record)
        if self.skipped_lines:
            log.warning(
                "answer cache: skipped %d partial or corrupt line(s) in %s",
                self.skipped_lines,
                self.directory,
            )
        return found

    def put(self, key: str, answer: Answer) -> None:
        if self._shard is None:
            self._shard = self._open_new_shard()
        self._shard.write(json.dumps(_record_from_answer(key, answer), ensure_ascii=False) + "\n")
        self._shard.flush()

    def close(self) -> None:
        if self._shard is not None:
            self._shard.close()
            self._shard = None

    def _open_new_shard(self) -> IO[str]:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        name = f"answers-{stamp}-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
        return open(self.directory / name, "a", encoding="utf-8")

    def _read_records(self, shard: Path):
        with open(shard, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                record = _parse_line(line)
                if record is None:
                    self.skipped_lines += 1
                    continue
                yield record


def _parse_line(line: str) -> dict | None:
    if not line.endswith("\n"):
        return None  # the partial last line of a killed writer
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("key"), str):
        return None
    if record.get("failure") is None and not isinstance(record.get("explanation"), str):
        return None  # an "ok" record must carry its explanation
    return record


def _record_from_answer(key: str, answer: Answer) -> dict:
    return {
        "key": key,
        "explanation": answer.explanation,
        "failure": answer.failure,
        "raw": answer.raw,
        "input_tokens": answer.input_tokens,
        "output_tokens": answer.output_tokens,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _answer_from_record(record: dict) -> Answer:
    return Answer(
        explanation=record.get("explanation"),
        failure=record.get("failure"),
        raw=record.get("raw"),
        input_tokens=int(record.get("input_tokens") or 0),
        output_tokens=int(record.get("output_tokens") or 0),
    )
