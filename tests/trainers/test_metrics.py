"""Metrics logger: JSONL rows, TensorBoard scalars, inert on non-main processes."""

from __future__ import annotations

import numpy as np
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainers.metrics import MetricsLogger, progress_bar, read_metrics


def test_rows_go_to_jsonl_and_numbers_to_tensorboard(tmp_path):
    with MetricsLogger(tmp_path) as log:
        log.log(1, {"train/loss": torch.tensor(2.5), "train/lr": np.float32(0.5), "phase": "warmup"})
        log.log(2, {"train/loss": 1.25, "train/nan": float("nan"), "flag": True})
    rows = read_metrics(tmp_path)
    assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 2.5), (2, 1.25)]
    assert rows[0]["train/lr"] == 0.5 and rows[0]["phase"] == "warmup" and rows[1]["flag"] is True

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    # Strings, booleans and non-finite values stay out of TensorBoard.
    assert sorted(events.Tags()["scalars"]) == ["train/loss", "train/lr"]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.5), (2, 1.25)]


def test_a_resumed_run_appends(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(1, {"x": 1})
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(2, {"x": 2})
    assert [r["x"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    assert not (tmp_path / "tensorboard").exists()


def test_disabled_logger_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "rank1", enabled=False)
    log.log(1, {"x": 1.0})
    log.close()
    assert not (tmp_path / "rank1").exists()
    bar = progress_bar(10, initial=3, enabled=False)
    assert bar.disable and bar.n == 3
    bar.close()


def test_a_run_resumed_from_a_checkpoint_drops_the_rows_after_it(tmp_path):
    # An interrupted run logged steps 1-4 (and half a line of step 5); its last checkpoint is step 2.
    with MetricsLogger(tmp_path) as log:
        for step in range(1, 5):
            log.log(step, {"x": float(step)})
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 5, "x"')
    with MetricsLogger(tmp_path, resume_step=2) as log:
        log.log(3, {"x": 30.0})
    assert [(r["step"], r["x"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    # TensorBoard purged the old steps 3 and 4 (purge_step = 3) before the new step 3.
    assert [(e.step, e.value) for e in events.Scalars("x")] == [(1, 1.0), (2, 2.0), (3, 30.0)]
