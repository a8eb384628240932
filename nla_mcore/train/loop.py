"""The training loop every stage shares: SFT of the AR and of the AV now, GRPO next.

A stage is a `Task`: the models it trains (`checkpointing.TrainedModel`), `train_step(step)`
(forward, backward and the health-checked update of update number `step`, returning its
metrics), `evaluate(step)`, and what a checkpoint must record about the data.  The loop owns
everything else, the same way for every stage: resuming, progress and metric files, loss-spike
warnings, evaluation and checkpoint cadence, the final checkpoint, the Hugging Face export and
the curves.  A training step on one screen is each task's `train_step`.

Steps are counted in updates: step 1 is the first optimizer update, `step_N` holds the state
after N of them, and the evaluation at step 0 runs before training.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from nla_mcore.train.checkpointing import CheckpointConfig, Checkpointer, TrainedModel
from nla_mcore.train.flops import peak_tflops
from nla_mcore.train.health import HealthConfig, SpikeDetector
from nla_mcore.train.metrics import METRICS_FILE, LoggingConfig, MetricsLog, memory_gib
from nla_mcore.train.optim import NonFiniteStepError


class Task(Protocol):
    label: str
    models: list[TrainedModel]
    total_steps: int

    def train_step(self, step: int) -> dict:
        """Update number `step`: loss, lr, grad_norm, tokens, flops (+ task-specific values)."""

    def evaluate(self, step: int) -> dict:
        """Held-out metrics after `step` updates ({} when there is no evaluation)."""

    def train_state(self, step: int) -> dict:
        """What a checkpoint after `step` updates records about the data (JSON-able)."""

    def check_resume(self, state: dict) -> None:
        """Refuse a checkpoint whose data state does not fit this run."""


@dataclass(kw_only=True, slots=True)
class LoopSettings:
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    health: HealthConfig
    eval_every: int
    stop_after: int | None = None
    """Leave after this step (with a checkpoint) though the schedule goes on."""


@dataclass
class RunResult:
    """How a run ended (rank 0 fills the paths)."""

    start_step: int
    final_step: int
    checkpoint: Path | None = None
    complete: bool = False
    """The schedule ran to its last step (False: stopped by `stop_after`)."""
    last_train: dict = field(default_factory=dict)
    last_eval: dict = field(default_factory=dict)


def train(
    task: Task, ckpt: Checkpointer, resume_from: Path | None, out_dir: Path, settings: LoopSettings
) -> RunResult:
    """Run `task` to `task.total_steps` (every rank); returns where it ended."""
    start = _resume(task, ckpt, resume_from)
    ckpt.remove_stale_temps()
    is_writer = torch.distributed.get_rank() == 0
    metrics = MetricsLog(
        settings.logging,
        out_dir,
        total_steps=task.total_steps,
        start_step=start,
        is_writer=is_writer,
        label=task.label,
    )
    result = RunResult(start_step=start, final_step=start)
    if start:
        metrics.say(f"resumed from {resume_from} at step {start}")
    try:
        _run_steps(task, ckpt, settings, metrics, result)
    except NonFiniteStepError:
        committed = ckpt.wait()  # a good checkpoint in flight is still committed
        if committed is not None:
            metrics.say(f"checkpoint step {committed} committed before stopping")
        raise
    finally:
        ckpt.close()
        metrics.close()
    return result


def _run_steps(task, ckpt, settings, metrics, result) -> None:
    total, every = task.total_steps, settings.checkpoint.every
    last = min(total, settings.stop_after or total)
    peak = peak_tflops(settings.logging.peak_tflops)
    spikes = SpikeDetector(settings.health)
    if result.start_step == 0 and settings.eval_every:
        result.last_eval = _evaluate(task, 0, metrics)
    for step in range(result.start_step + 1, last + 1):
        started = time.perf_counter()
        values = task.train_step(step)
        values = with_rates(values, time.perf_counter() - started, peak)
        metrics.train(step, values)
        result.last_train, result.final_step = values, step
        median = spikes.check(values["loss"])
        if median is not None:
            metrics.event(
                step,
                f"loss spike at step {step}: {values['loss']:.4f} is more than "
                f"{settings.health.spike_factor}x the recent median {median:.4f}",
            )
        committed = ckpt.poll()
        if committed is not None:
            metrics.event(step, f"checkpoint step {committed} committed", committed=committed)
        if step == last:
            break
        if settings.eval_every and step % settings.eval_every == 0:
            result.last_eval = _evaluate(task, step, metrics)
        if every and step % every == 0:
            _save(ckpt, task, step, metrics)
    result.complete = result.final_step == total
    if result.final_step > result.start_step:
        if settings.eval_every and result.complete:
            result.last_eval = _evaluate(task, total, metrics)
        ckpt.save(result.final_step, task.models, task.train_state(result.final_step), final=True)
    if not result.complete:
        metrics.say(
            f"stopping after step {result.final_step} of {total} (train.stop_after); "
            "run again with checkpoint.resume=auto to continue"
        )
    result.checkpoint = ckpt.root / f"step_{result.final_step:07d}"


def _save(ckpt, task, step, metrics) -> None:
    report = ckpt.save(step, task.models, task.train_state(step))
    if report.committed is not None:
        metrics.event(
            step,
            f"checkpoint step {report.committed} committed (the next save waited "
            f"{report.previous_s:.2f} s for it)",
            committed=report.committed,
            waited_s=report.previous_s,
        )
    how = "in the background" if ckpt.cfg.async_save else "synchronously"
    metrics.event(
        step,
        f"checkpoint step {step}: saving ({how}, the step waited {report.stall_s:.2f} s)",
        stall_s=report.stall_s,
    )


def _evaluate(task, step, metrics) -> dict:
    values = task.evaluate(step)
    metrics.eval(step, values)
    return values


def with_rates(values: dict, seconds: float, peak: float | None) -> dict:
    """Add time, tokens/s, TFLOP/s per GPU, MFU and memory to a step's metrics."""
    world = torch.distributed.get_world_size()
    tflops = values.get("flops", 0.0) / max(seconds, 1e-9) / world / 1e12
    out = dict(values)
    out.update(
        step_time_s=round(seconds, 4),
        tokens_per_s=values.get("tokens", 0) / max(seconds, 1e-9),
        tflops_per_gpu=tflops,
        mfu=tflops / peak if peak else None,
        mem_gib=memory_gib(),
    )
    return out


def _resume(task: Task, ckpt: Checkpointer, resume_from: Path | None) -> int:
    if resume_from is None:
        return 0
    state = ckpt.load(resume_from, task.models)
    task.check_resume(state)
    return int(state["step"])


def metrics_path(out_dir: Path) -> Path:
    return Path(out_dir) / METRICS_FILE
