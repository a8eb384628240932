"""The PNG at the end of a run: training loss, learning rate, and the evaluation curves.

Drawn from `metrics.jsonl` alone (so it can be redrawn for any run, finished or not) with
matplotlib's Agg backend; without matplotlib the run goes on and says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

from nla_mcore.train.metrics import read_metrics

log = logging.getLogger(__name__)

# Evaluation values drawn, in this order, when the run logged them.
EVAL_PANELS = (("fve", "FVE (rawvar baseline)"), ("loss", "held-out loss"))


def plot_run(metrics_path: Path, out_png: Path, *, title: str) -> Path | None:
    """Write `out_png`; returns it, or None when matplotlib is missing or there is no data."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no %s", out_png.name)
        return None
    records = read_metrics(Path(metrics_path))
    train, evals = records.get("train", []), records.get("eval", [])
    if not train:
        return None
    panels = [(k, label) for k, label in EVAL_PANELS if any(k in r for r in evals)]
    fig, axes = plt.subplots(1, 2 + len(panels), figsize=(5 * (2 + len(panels)), 3.6))
    _curve(axes[0], train, "loss", "training loss", label="train")
    if "loss" in {k for k, _ in panels}:
        _curve(axes[0], evals, "loss", "training loss", label="held-out", marker="o")
        axes[0].legend()
    _curve(axes[1], train, "lr", "learning rate")
    for ax, (key, label) in zip(axes[2:], panels, strict=True):
        shuffled = key == "loss" and any("loss_shuffled" in r for r in evals)
        _curve(ax, evals, key, label, label="own vectors" if shuffled else None, marker="o")
        if shuffled:
            _curve(ax, evals, "loss_shuffled", label, label="shuffled vectors", marker="x")
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png


def _curve(ax, records, key, ylabel, *, label=None, marker=None) -> None:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    if points:
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker=marker, markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
