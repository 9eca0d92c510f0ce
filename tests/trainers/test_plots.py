"""trainers/plots.py: training curves from metrics.jsonl with one command, and the reward curve."""

from __future__ import annotations

import json
import math

import matplotlib.image
import pytest

from trainers.plots import PlotError, curve_panels, main, plot_reward_curves, plot_training_curves, series

ADRPO_ROWS = [
    {"step": 1, "reward/mean": 0.0, "reward/task_mean": 0.5, "reward/valid_rate": 0.25, "train/kl_mean": 0.0, "train/loss": 0.1},
    {"step": 2, "reward/mean": 0.2, "reward/task_mean": 0.5, "reward/valid_rate": 0.5, "train/kl_mean": 0.01, "train/loss": math.nan},
    {"step": 3, "reward/mean": 0.4, "reward/valid_rate": 0.75, "train/kl_mean": 0.02, "train/loss": -0.1, "note": "x"},
]  # fmt: skip


def _write(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_series_skip_missing_non_numeric_and_non_finite_values():
    rows = [{"step": 1, "a": 1}, {"step": 2, "a": math.inf}, {"step": 3, "a": True}, {"step": 4}, {"step": 5, "a": "x"},
            {"step": 6, "a": 2.5}]  # fmt: skip
    assert series(rows, "a") == ([1, 6], [1.0, 2.5])


def test_panels_of_an_adrpo_run_and_of_an_sft_run():
    panels = curve_panels(ADRPO_ROWS)
    assert [p[0] for p in panels] == ["reward", "validity", "KL to the reference", "loss"]
    reward = panels[0][2]
    # task reward is missing at step 3; the loss is NaN at step 2: both left out, not drawn as 0.
    assert reward == {"reward": ([1, 2, 3], [0.0, 0.2, 0.4]), "task reward": ([1, 2], [0.5, 0.5])}
    assert panels[1][2] == {"validity rate": ([1, 2, 3], [0.25, 0.5, 0.75])}
    assert panels[3][2] == {"loss": ([1, 3], [0.1, -0.1])}
    sft_rows = [{"step": s, "train/loss": 3.0 - s, "train/lr": 1e-3} for s in (1, 2)]
    assert curve_panels(sft_rows) == [("loss", "training loss", {"loss": ([1, 2], [2.0, 1.0])})]


def test_the_command_writes_one_panel_per_curve_kind_and_prints_the_path(tmp_path, capsys):
    run = _write(tmp_path / "run", ADRPO_ROWS)
    assert main([str(run)]) == 0
    png = run / "training_curves.png"
    assert capsys.readouterr().out == f"{png}\n"
    # 4 panels of 4.2 x 3.6 inches at 100 dpi: 1680 x 360 pixels.
    assert matplotlib.image.imread(png).shape[:2] == (360, 1680)
    sft = _write(tmp_path / "sft", [{"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": 1.0}])
    out = tmp_path / "plots" / "sft.png"
    assert main([str(sft / "metrics.jsonl"), "--out", str(out), "--title", "SFT"]) == 0
    assert matplotlib.image.imread(out).shape[:2] == (360, 420)  # the loss panel only


def test_the_command_says_what_is_wrong(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    _write(tmp_path, [{"step": 1, "time": 3.0}])
    with pytest.raises(PlotError, match="no step has any of reward/mean"):
        plot_training_curves(tmp_path)
    assert not (tmp_path / "training_curves.png").exists()


def test_the_reward_curve_still_draws(tmp_path):
    png = plot_reward_curves(_write(tmp_path, ADRPO_ROWS) / "metrics.jsonl", tmp_path / "r.png")
    assert matplotlib.image.imread(png).shape[:2] == (400, 700)
