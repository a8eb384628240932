"""What a run reports, on rank 0: a progress line, `metrics.jsonl`, optional TensorBoard.

Every record of `metrics.jsonl` is one JSON object with `kind` (train | eval | event), `step`
(optimizer updates completed: the first update is step 1, evaluations at step 0 run before
training) and the values.  A resumed run appends; readers keep the last record of each
(kind, step), since the steps after the resumed checkpoint are trained again.

On a terminal the progress is a tqdm bar (step, loss, lr, grad-norm, tokens/s, MFU, memory,
ETA); in a log file (no terminal) the same values are printed as one line every
`logging.every` steps.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


@dataclass(kw_only=True, slots=True)
class LoggingConfig:
    """Progress output and metric files."""

    every: int = 1
    """Write a train record (and, without a terminal, print a line) every this many steps."""
    progress: bool = True
    """Show a progress bar on rank 0 when stdout is a terminal."""
    tensorboard: bool = False
    """Also write TensorBoard event files under output_dir/tensorboard (needs `tensorboard`)."""
    peak_tflops: float | None = None
    """Per-GPU peak for MFU; null: the card's dense bf16 peak if known (H100/H200: 989), else
    no MFU (CPU)."""
    plot: bool = True
    """Write output_dir/curves.png (loss, learning rate, evaluation) at the end (matplotlib)."""

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"logging.every={self.every}: set 1 or more")
        if self.tensorboard:
            try:
                import tensorboard  # noqa: F401
            except ImportError as err:
                raise ValueError(
                    "logging.tensorboard=true needs the tensorboard package: "
                    "pip install 'nla-mcore[tensorboard]'"
                ) from err


class MetricsLog:
    """Rank 0's metric writer (other ranks get one that writes nothing)."""

    def __init__(
        self,
        cfg: LoggingConfig,
        out_dir: Path,
        *,
        total_steps: int,
        start_step: int,
        is_writer: bool,
        label: str,
    ):
        self.cfg, self.total, self.label, self.is_writer = cfg, total_steps, label, is_writer
        self.start_step, self.started = start_step, time.monotonic()
        self.file = self.bar = self.tb = None
        if not is_writer:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(out_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        if cfg.progress and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps, initial=start_step, desc=label, unit="step", dynamic_ncols=True
            )

    def train(self, step: int, values: dict) -> None:
        """Record the metrics of update `step` (1-based)."""
        if not self.is_writer:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(summary(values), refresh=False)
        if step % self.cfg.every and step != self.total:
            return
        self._write("train", step, values)
        if self.bar is None:
            print(
                f"[{self.label}] step {step}/{self.total}  {summary(values)}  "
                f"ETA {self._eta(step)}",
                flush=True,
            )

    def eval(self, step: int, values: dict) -> None:
        if not self.is_writer or not values:
            return
        self._write("eval", step, values)
        shown = "  ".join(f"{k} {_fmt(v)}" for k, v in values.items())
        self.say(f"eval at step {step}: {shown}")

    def event(self, step: int, message: str, **values) -> None:
        if not self.is_writer:
            return
        self._write("event", step, {"message": message, **values})
        self.say(message)

    def say(self, message: str) -> None:
        """A line on the console (above the bar when there is one)."""
        if not self.is_writer:
            return
        line = f"[{self.label}] {message}"
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()
            self.file = None

    def _write(self, kind: str, step: int, values: dict) -> None:
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"{kind}/{key}", value, step)

    def _eta(self, step: int) -> str:
        done = step - self.start_step
        if done <= 0:
            return "?"
        left = (time.monotonic() - self.started) / done * (self.total - step)
        return time.strftime("%H:%M:%S", time.gmtime(left))


def summary(values: dict) -> str:
    """The progress values in a fixed order, compactly."""
    parts = [
        f"loss {values['loss']:.4f}",
        f"lr {values['lr']:.2e}",
        f"grad-norm {values['grad_norm']:.3f}",
        f"{values['tokens_per_s']:,.0f} tok/s",
    ]
    if values.get("mfu") is not None:
        parts.append(f"MFU {values['mfu']:.1%}")
    if values.get("mem_gib") is not None:
        parts.append(f"mem {values['mem_gib']:.1f} GiB")
    return "  ".join(parts)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def read_metrics(path: Path) -> dict[str, list[dict]]:
    """{kind: records sorted by step}, keeping the last record of each (kind, step)."""
    last: dict[tuple[str, int], dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                last[(record["kind"], record["step"])] = record
    out: dict[str, list[dict]] = {}
    for (kind, _), record in sorted(last.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        out.setdefault(kind, []).append(record)
    return out


def memory_gib() -> float:
    """Peak device memory of this rank since the last call (GiB); the process RSS on the CPU."""
    import torch

    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        return peak
    import psutil

    return psutil.Process().memory_info().rss / 2**30
