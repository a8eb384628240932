"""Crash-resume of the Explain stage: `kill -9` mid-run, restart, finish without paying twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from activation_files import row_texts, write_activations
from fake_anthropic import FakeAnthropic, passage_of

from nla_mcore.datagen.explain import key_for, run_explain

N_ROWS = 80
KILL_AFTER_CACHED = 12


def _cached_keys(cache_dir: Path) -> set[str]:
    keys = set()
    for shard in cache_dir.glob("answers-*.jsonl"):
        for line in shard.read_text().splitlines(keepends=True):
            if line.endswith("\n"):
                keys.add(json.loads(line)["key"])
    return keys


def _start_explain_process(
    src: Path, out: Path, cache_dir: Path, base_url: str
) -> subprocess.Popen:
    overrides = [
        f"base_url={base_url}",
        f"cache_dir={cache_dir}",
        "concurrency=2",
        "progress=false",
        "timeout_s=10",
        "backoff_initial_s=0.01",
    ]
    cmd = [
        sys.executable,
        "-m",
        "nla_mcore.datagen.explain",
        "--input",
        str(src),
        "--output",
        str(out),
        *overrides,
    ]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ)
    )


def _wait_for_cached(
    cache_dir: Path, proc: subprocess.Popen, n: int, timeout_s: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while len(_cached_keys(cache_dir)) < n:
        assert proc.poll() is None, f"explain process exited early:\n{proc.stdout.read().decode()}"
        assert time.monotonic() < deadline, "explain process cached too little in time"
        time.sleep(0.01)


def test_kill_mid_run_then_restart_completes_without_asking_cached_rows(
    tmp_path, api_key, fast_cfg
):
    """The stage runs in a subprocess (the real CLI entry point) and is killed with SIGKILL once some
    answers are cached. The restart must complete every row and must never request a text whose
    answer was cached before the kill (in-flight, uncached texts may be asked again: they were not
    saved). The output must not exist until the restarted run finishes."""
    src = write_activations(tmp_path / "acts.parquet", row_texts(N_ROWS))
    out, cache_dir = tmp_path / "out.parquet", tmp_path / "cache"
    with FakeAnthropic(api_key=api_key, delay_s=0.03) as fake:
        proc = _start_explain_process(src, out, cache_dir, fake.base_url)
        try:
            _wait_for_cached(cache_dir, proc, KILL_AFTER_CACHED)
        finally:
            proc.kill()
            proc.wait(timeout=10)
        assert proc.returncode == -9
        assert not out.exists(), "a killed run must not leave an output"
        cached_before = _cached_keys(cache_dir)
        asked_before = len(fake.message_requests())

        cfg = fast_cfg(fake.base_url, cache_dir=str(cache_dir))
        summary = run_explain(cfg, src, out)
        asked_after = [passage_of(r.prompt) for r in fake.message_requests()[asked_before:]]

    assert len(cached_before) >= KILL_AFTER_CACHED and len(cached_before) < N_ROWS
    keys_asked_after = {key_for(cfg, text) for text in asked_after}
    assert not keys_asked_after & cached_before, (
        "a cached row was requested again after the restart"
    )
    assert len(asked_after) == len(set(asked_after)) == N_ROWS - len(cached_before)
    assert summary.ok == N_ROWS and summary.cache_hits == len(cached_before)
    assert pq.read_table(out).column("explain_status").to_pylist() == ["ok"] * N_ROWS
