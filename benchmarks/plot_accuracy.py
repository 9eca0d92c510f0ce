"""Accuracy by question category and builder, from the summaries of accuracy-runner runs.

    python -m benchmarks.plot_accuracy runs/locomo-rag runs/locomo-annotation [--out accuracy.png]

Each RUN_DIR is an `--out` folder of `benchmarks.eval_memory` (its `summary.json` is read). One
group of bars per question group (the overall score first, then each category, then the groups
reported apart, such as LoCoMo's adversarial questions), one bar per run, labelled by builder
and embedder (and dataset, when the runs are on more than one). The runner draws the same plot
for a single run as `accuracy.png` in its folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class PlotError(RuntimeError):
    """The runs cannot be plotted (the message says which folder and why)."""


def load_summary(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise PlotError(f"{run_dir}: no summary.json (is it an --out folder of benchmarks.eval_memory?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PlotError(f"{path}: not JSON ({exc.msg})") from None


def groups_of(summary: dict) -> list[tuple[str, dict]]:
    """(label, stats) per question group, in the order the runner's summary lists them."""
    covers = summary["overall_covers"]
    out = [(f"overall\n({covers.replace(' ', chr(10)) if len(covers) > 14 else covers})", summary["overall"])]
    out += [(name, st) for name, st in summary["categories"].items()]
    out += [(f"{name}\n(apart)", st) for name, st in summary["apart"].items()]
    return out


def run_label(summary: dict, with_dataset: bool) -> str:
    label = f"{summary['builder']}, {summary['embedder']}"
    if summary.get("answerer") not in (None, "extractive") or summary.get("judge") not in (None, "rule"):
        label += f" ({summary['answerer']} / {summary['judge']})"
    return f"{summary['dataset']}: {label}" if with_dataset else label


def accuracy_table(summaries: list[dict]) -> tuple[list[str], dict[str, list[tuple[float, int] | None]]]:
    """The plotted numbers: group labels, and per run (accuracy %, judged) per group, None where absent."""
    with_dataset = len({s["dataset"] for s in summaries}) > 1
    labels = list(dict.fromkeys(label for s in summaries for label, _ in groups_of(s)))
    table = {}
    for s in summaries:
        stats = dict(groups_of(s))
        cells = []
        for label in labels:
            st = stats.get(label)
            # a group this run lacks, or in which nothing was judged, has no bar
            cells.append(None if st is None or st["accuracy"] is None else (100 * st["accuracy"], st["judged"]))
        name = run_label(s, with_dataset)
        while name in table:  # two runs with the same settings (e.g. two seeds) stay apart
            name += "'"
        table[name] = cells
    return labels, table


def plot_accuracy(summaries: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Grouped bars of accuracy % per question group, one bar per summary; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not summaries:
        raise PlotError("no runs to plot")
    labels, table = accuracy_table(summaries)
    width = 0.8 / len(table)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(labels) * max(1, len(table) / 2) + 2), 4.6))
    for i, (name, cells) in enumerate(table.items()):
        xs = [j - 0.4 + width * (i + 0.5) for j, c in enumerate(cells) if c is not None]
        heights = [c[0] for c in cells if c is not None]
        bars = ax.bar(xs, heights, width, label=name)
        for bar, h in zip(bars, heights):
            ax.text(bar.get_x() + bar.get_width() / 2, h + 0.5, f"{h:.1f}", ha="center", va="bottom", fontsize=7)
    # long category names (LongMemEval's "single-session-preference") are broken at their hyphens
    ax.set_xticks(range(len(labels)), [lb.replace("-", "-\n") if len(lb) > 14 and "\n" not in lb else lb
                                       for lb in labels], fontsize=8)
    ax.set_ylabel("accuracy % (correct / judged)")
    top = max((c[0] for cells in table.values() for c in cells if c is not None), default=0.0)
    ax.set_ylim(0, min(100.0, top * 1.2 + 5))
    judges = sorted({s.get("judge", "?") for s in summaries})
    ax.set_title(title or f"Accuracy by question group ({', '.join(sorted({s['dataset'] for s in summaries}))}; "
                          f"judge {', '.join(judges)})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plot_accuracy", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="--out folders of benchmarks.eval_memory")
    p.add_argument("--out", default="accuracy.png", help="PNG to write (default accuracy.png)")
    p.add_argument("--title", help="plot title (default: datasets and judges)")
    args = p.parse_args(argv)
    try:
        path = plot_accuracy([load_summary(r) for r in args.runs], args.out, args.title)
    except PlotError as exc:
        print(f"plot_accuracy: {exc}", file=sys.stderr)
        return 2
    print(f"plot_accuracy: {len(args.runs)} run(s) plotted in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
