"""Crash-resume of the Extract stage: `kill -9` after a complete shard, rerun, same files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from datagen_toys import documents, extract_config, make_toy, one_torch_thread, write_jsonl

from nla_mcore.datagen.extract import run_extract
from nla_mcore.datagen.providers import HFActivationProvider
from nla_mcore.toy_tokenizers import build_toy_tokenizer

WORKER = Path(__file__).with_name("extract_worker.py")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models, shared 2-core machine: one torch thread is faster (see one_torch_thread)."""
    with one_torch_thread():
        yield


def _start_worker(model_dir: Path, corpus: Path, out_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, str(WORKER), str(model_dir), "llama", str(corpus), str(out_dir), "0.15"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for_shards(out_dir: Path, proc: subprocess.Popen, n: int, timeout_s: float = 60) -> int:
    """Shards the manifest lists once it lists at least `n` (the worker must still be running)."""
    manifest = out_dir / "extract-manifest-dp000.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"worker exited early:\n{proc.stdout.read().decode()}"
        if manifest.exists():
            done = len(json.loads(manifest.read_text())["shards"])
            if done >= n:
                return done
        time.sleep(0.02)
    raise AssertionError(f"no complete shard within {timeout_s} s")


def _visible_files(directory: Path) -> dict[str, bytes]:
    """Every non-hidden file's bytes; sidecars without their `created_at` line (a timestamp)."""
    files = {}
    for path in sorted(directory.iterdir()):
        data = path.read_bytes()
        if path.name.endswith(".nla_meta.yaml"):
            data = b"\n".join(ln for ln in data.splitlines() if not ln.startswith(b"created_at:"))
        files[path.name] = data
    return files


def test_kill_after_a_shard_then_resume_gives_identical_files(tmp_path):
    """The resume contract: a run killed with SIGKILL (no cleanup, maybe mid-write of the next
    shard) and rerun must end with byte-identical shards and manifest to an uninterrupted run,
    must not redo the shards it had finished, and must leave no temporary file behind."""
    toy = make_toy("llama", tmp_path)
    corpus = write_jsonl(tmp_path / "c.jsonl", documents(32, seed=11))
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"

    proc = _start_worker(toy.model_dir, corpus, killed_dir)
    try:
        _wait_for_shards(killed_dir, proc, n=1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    manifest = json.loads((killed_dir / "extract-manifest-dp000.json").read_text())
    done_before_kill = len(manifest["shards"])

    tokenizer = build_toy_tokenizer("llama")
    cfg = extract_config([corpus])
    resumed = run_extract(cfg, HFActivationProvider(toy.model_dir), tokenizer, out_dir=killed_dir)
    uninterrupted = run_extract(
        cfg, HFActivationProvider(toy.model_dir), tokenizer, out_dir=clean_dir
    )

    assert resumed.complete and len(resumed.shards) == 4 > done_before_kill
    assert _visible_files(killed_dir) == _visible_files(clean_dir)
    assert not [p for p in killed_dir.iterdir() if p.name.startswith(".")]
    # the finished shards were not redone: only the documents of the later ones were read again
    assert resumed.docs_this_call == resumed.stats.docs_read - 8 * done_before_kill
    assert resumed.stats.to_json() == uninterrupted.stats.to_json()
