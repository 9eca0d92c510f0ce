"""Reward curves as PNG, from a run's metrics.jsonl (matplotlib, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

from trainers.metrics import read_metrics

CURVES = (
    ("reward/mean", "reward"),
    ("reward/task_mean", "task reward"),
    ("reward/valid_rate", "validity rate"),
)


def plot_reward_curves(metrics_path: str | Path, png_path: str | Path, title: str = "ADRPO") -> Path:
    """Plot reward, task reward and validity rate per step into `png_path`; returns it."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works on machines without a display
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, label in CURVES:
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean over the step's samples")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
