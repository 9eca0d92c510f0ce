"""Metrics to JSONL and TensorBoard (main process only), and a tqdm progress bar.

Each `log(step, metrics)` call appends one JSON line `{"step": ..., "time": ..., **metrics}` to
`<dir>/metrics.jsonl` and writes every numeric value as a TensorBoard scalar under its name (use
"/" in names to group them, e.g. "train/loss"). On non-main processes both are no-ops, so the
trainer calls them unconditionally.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm


class MetricsLogger:
    """JSONL + TensorBoard writer; inert when `enabled` is False (non-main processes)."""

    def __init__(
        self, log_dir: str | Path, enabled: bool = True, tensorboard: bool = True, resume_step: int | None = None
    ):
        """`resume_step`: the step of the checkpoint a resumed run starts from. Rows of later steps
        (written by the interrupted run after that checkpoint) are dropped from metrics.jsonl and
        TensorBoard purges its events after that step, so no step is recorded twice."""
        self.log_dir = Path(log_dir)
        self.enabled = enabled
        self._jsonl = None
        self._writer: SummaryWriter | None = None
        if not enabled:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_metrics(self.log_dir / "metrics.jsonl", resume_step)
        # Appending keeps the history of a resumed run in one file.
        self._jsonl = (self.log_dir / "metrics.jsonl").open("a")
        if tensorboard:
            purge = {"purge_step": resume_step + 1} if resume_step is not None else {}
            self._writer = SummaryWriter(log_dir=str(self.log_dir / "tensorboard"), **purge)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record `metrics` at optimizer step `step` (floats, ints, or short strings)."""
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3)}
        for key, value in metrics.items():
            row[key] = value.item() if isinstance(value, (torch.Tensor, np.generic)) else value
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._writer is not None:
            for key, value in row.items():
                if key in ("step", "time") or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if math.isfinite(value):
                    self._writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def truncate_metrics(path: str | Path, last_step: int) -> int:
    """Drop the rows of `path` (a metrics.jsonl) whose step is above `last_step`; returns how many.

    Rewritten through a temporary file and renamed, so a crash here loses nothing. A line that
    does not parse (a row cut short by a kill) is dropped too.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > last_step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    return dropped


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file (or of `<dir>/metrics.jsonl` when given a folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def progress_bar(total: int, initial: int = 0, enabled: bool = True, desc: str = "train") -> tqdm:
    """A tqdm bar over optimizer steps (disabled on non-main processes)."""
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True, unit="step")
