"""`nla-mcore sft-ar` / `sft-av` as a user runs them: help, checks before launch, bad data,
kill -9 in the middle of an async checkpoint, resume, export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nla_mcore.cli import main as cli_main
from nla_mcore.toy_tokenizers import build_toy_tokenizer
from nla_mcore.train.checkpointing import CheckpointConfig, Checkpointer
from tests.converters.convert_worker import make_hf_model
from tests.train.sft_toys import sft_files

QUICK = [
    "device=cpu",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.eval_every=0",
    "data.eval_fraction=0",
    "optim.warmup_steps=1",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_cli")
    return (
        root,
        make_hf_model("qwen2", root / "hf"),
        sft_files(root / "data", build_toy_tokenizer("qwen2")),
    )


def cli(*args, env=None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "nla_mcore.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
        **kwargs,
    )


def finish(proc: subprocess.Popen, timeout=240) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


@pytest.mark.parametrize(
    "verb,key", [("sft-ar", "model.mse_scale"), ("sft-av", "model.injection_scale")]
)
def test_help_lists_every_key(capsys, verb, key):
    """`--help` shows every config key with its default and its docstring."""
    assert cli_main([verb, "--help"]) == 0
    text = capsys.readouterr().out
    for needle in (
        key,
        "optim.lr = 2e-05",
        "checkpoint.resume = 'auto'",
        "data.skip_bad_rows",
        "parallel.tensor_parallel",
        "train.stop_after",
        "Peak learning rate",
    ):
        assert needle in text, needle


def test_wrong_split_is_refused_before_any_rank_starts(world, capsys):
    """Giving sft-av the AR's file fails in the CLI process, naming both stages."""
    root, model, data = world
    code = cli_main(
        [
            "sft-av",
            f"model.source={model}",
            f"data.train_file={data['ar_sft']}",
            f"output_dir={root / 'never'}",
            "nproc=2",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "is a ar_sft file" in err and "sft-av trains on av_sft" in err, err
    assert not (root / "never").exists()


@pytest.mark.slow
def test_bad_row_fails_on_every_rank_before_training(world):
    """A NaN vector in row 5 stops a 2-rank run before its first step: one clean message that
    names the file and the row, a non-zero exit, no checkpoint."""
    root, model, data = world
    table = pq.read_table(data["av_sft"])
    vectors = np.array(table.column("activation_vector").to_pylist(), dtype=np.float32)
    vectors[5, 3] = np.nan
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1])
    bad = root / "bad" / "av_sft.parquet"
    bad.parent.mkdir()
    pq.write_table(
        table.set_column(
            table.schema.get_field_index("activation_vector"), "activation_vector", column
        ),
        bad,
    )
    bad.with_name(bad.name + ".nla_meta.yaml").write_bytes(
        Path(f"{data['av_sft']}.nla_meta.yaml").read_bytes()
    )
    code, out = finish(
        cli(
            "sft-av",
            f"model.source={model}",
            f"data.train_file={bad}",
            f"output_dir={root / 'bad_run'}",
            "nproc=2",
            *QUICK,
        )
    )
    assert code != 0
    assert "nla-mcore sft-av: error:" in out and "av_sft.parquet: row 5" in out, out
    assert "NaN" in out and "Traceback" not in out, out
    assert not (root / "bad_run" / "checkpoints").exists()


def test_half_written_checkpoints_are_never_resumed(tmp_path):
    """Only directories named step_N that hold train_state.json count: a temp directory of a
    save in flight and a step directory without its state file are ignored."""
    root = tmp_path / "checkpoints"
    for name, complete in (
        ("step_0000002", True),
        ("step_0000004", True),
        (".step_0000006.tmp-abc", True),
        ("step_0000008", False),
    ):
        (root / name / "ar" / "model").mkdir(parents=True)
        if complete:
            (root / name / "train_state.json").write_text(json.dumps({"format": 1, "step": 0}))
    ckpt = Checkpointer(CheckpointConfig(async_save=False), root)
    assert [step for step, _ in ckpt.complete_steps()] == [2, 4]
    assert ckpt.resume_dir() == root / "step_0000004"
    with pytest.raises(ValueError, match="already holds checkpoints"):
        Checkpointer(CheckpointConfig(async_save=False, resume="none"), root).resume_dir()


@pytest.mark.slow
def test_kill_during_async_save_keeps_the_previous_checkpoint(world):
    """kill -9 while a background save is being written: the previous checkpoint stays
    complete, the partial one is a temp directory that resume ignores, and the next run resumes
    from the previous one, finishes, exports and draws its curves."""
    root, model, data = world
    out = root / "killed"
    args = [
        "sft-ar",
        f"model.source={model}",
        f"data.train_file={data['ar_sft']}",
        f"output_dir={out}",
        "train.steps=8",
        "checkpoint.every=2",
        *QUICK,
    ]
    code, log = finish(cli(*args, "train.stop_after=4"))
    assert code == 0, log
    proc = cli(*args, env={"NLA_MCORE_CKPT_WRITE_DELAY_S": "120"}, start_new_session=True)
    deadline = time.monotonic() + 180
    seen = ""
    while "checkpoint step 6: saving" not in seen:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, seen
        seen += line
        assert time.monotonic() < deadline, seen
    os.killpg(proc.pid, signal.SIGKILL)  # the rank and its forked checkpoint writer
    proc.wait()
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_0000002", "step_0000004"]
    assert list(checkpoints.glob(".step_0000006.tmp-*")), "the partial save should be left"
    code, log = finish(cli(*args))
    assert code == 0, log
    assert "resumed from" in log and "step_0000004 at step 4" in log, log
    assert not list(checkpoints.glob(".step_*")), "stale partial saves are cleaned on resume"
    train = [
        json.loads(line)
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if '"train"' in line
    ]
    assert sorted({r["step"] for r in train}) == list(range(1, 9))
    exported = out / "hf"
    assert (exported / "value_head.safetensors").is_file() and (exported / "config.json").is_file()
    sidecar = (exported / "nla_meta.yaml").read_text()
    assert "stage: sl" in sidecar and "step: 8" in sidecar, sidecar
    assert (out / "curves.png").is_file()
