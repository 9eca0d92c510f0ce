"""Training curves as PNG, from a run's metrics.jsonl (matplotlib, no display needed).

    python -m trainers.plots RUN_DIR [--out PNG] [--title TITLE]

draws `RUN_DIR/training_curves.png` (or `--out`): one panel each for the reward, the validity
rate, the KL to the reference and the loss, per optimizer step, leaving out panels the run has no
values for (an SFT run has only the loss), and prints the PNG's path. The trainers draw the same
file at the end of a run; the ADRPO trainer also draws `reward_curve.png` (`plot_reward_curves`).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from trainers.metrics import read_metrics

CURVES = (
    ("reward/mean", "reward"),
    ("reward/task_mean", "task reward"),
    ("reward/valid_rate", "validity rate"),
)

# (panel title, y label, ((metric key, legend label), ...)), in drawing order.
PANELS = (
    ("reward", "mean over the step's samples", (("reward/mean", "reward"), ("reward/task_mean", "task reward"))),
    ("validity", "share of valid outputs", (("reward/valid_rate", "validity rate"),)),
    ("KL to the reference", "k3 estimate, token mean", (("train/kl_mean", "KL"),)),
    ("loss", "training loss", (("train/loss", "loss"),)),
)


class PlotError(ValueError):
    """The metrics cannot be plotted (the message says which file and why)."""


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over `rows`, skipping rows without a finite number for it."""
    points = [
        (r["step"], float(r[key]))
        for r in rows
        if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])
    ]
    return [s for s, _ in points], [v for _, v in points]


def curve_panels(rows: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, tuple[list[int], list[float]]]]]:
    """The panels `plot_training_curves` draws: (title, y label, {legend label: (steps, values)}),
    only the curves with at least one value and only the panels with at least one curve."""
    panels = []
    for title, ylabel, curves in PANELS:
        drawn = {label: series(rows, key) for key, label in curves}
        drawn = {label: xy for label, xy in drawn.items() if xy[0]}
        if drawn:
            panels.append((title, ylabel, drawn))
    return panels


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works on machines without a display
    import matplotlib.pyplot as plt

    return plt


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)  # steps are whole numbers: no 1.2, 1.4 ticks on short runs


def _save(fig, png_path: str | Path) -> Path:
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png_path)
    return png_path


def plot_reward_curves(metrics_path: str | Path, png_path: str | Path, title: str = "ADRPO") -> Path:
    """Plot reward, task reward and validity rate per step into `png_path`; returns it."""
    plt = _pyplot()
    rows = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, label in CURVES:
        steps, values = series(rows, key)
        if steps:
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=label)
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_ylabel("mean over the step's samples")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    try:
        return _save(fig, png_path)
    finally:
        plt.close(fig)


def plot_training_curves(run: str | Path, png_path: str | Path | None = None, title: str | None = None) -> Path:
    """Draw the reward, validity, KL and loss panels of a run into `png_path` (default
    `<run>/training_curves.png`); `run` is a run folder or its metrics.jsonl. Returns the PNG's path."""
    run = Path(run)
    metrics = run / "metrics.jsonl" if run.is_dir() else run
    if not metrics.is_file():
        raise PlotError(f"{run}: no metrics.jsonl (is it the checkpoint.output_dir of a training run?)")
    try:
        rows = read_metrics(metrics)
    except ValueError as exc:
        raise PlotError(f"{metrics}: a line is not JSON ({exc})") from None
    panels = curve_panels(rows)
    if not panels:
        keys = ", ".join(key for _, _, curves in PANELS for key, _ in curves)
        raise PlotError(f"{metrics}: no step has any of {keys}")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), dpi=100, squeeze=False)
    for ax, (panel, ylabel, curves) in zip(axes[0], panels, strict=True):
        for label, (steps, values) in curves.items():
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=label)
        ax.set_title(panel)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend()
    fig.suptitle(title or metrics.parent.name)
    try:
        return _save(fig, png_path if png_path is not None else metrics.parent / "training_curves.png")
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainers.plots", description="Training curves (reward, validity, KL, loss) of a run as a PNG."
    )
    parser.add_argument("run", metavar="RUN_DIR", help="a run's checkpoint.output_dir, or its metrics.jsonl")
    parser.add_argument("--out", help="PNG to write (default: RUN_DIR/training_curves.png)")
    parser.add_argument("--title", help="figure title (default: the run folder's name)")
    args = parser.parse_args(argv)
    try:
        path = plot_training_curves(args.run, args.out, args.title)
    except PlotError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
