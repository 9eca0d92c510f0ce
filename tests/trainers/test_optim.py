"""Optimizer and schedules shared by the trainers (trainers.optim)."""

import pytest
import torch

from trainers.config import OptimConfig
from trainers.optim import build_optimizer, build_scheduler


def _lrs(o: OptimConfig, steps: int) -> list[float]:
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, o)
    sched = build_scheduler(opt, o, total_steps=steps)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_constant_schedule_after_warmup_and_cosine_to_the_floor():
    # constant, 2 warmup steps: lr * [0/2, 1/2, 1, 1, 1]
    assert _lrs(OptimConfig(lr=1e-6, schedule="constant", warmup_steps=2), 5) == pytest.approx([0, 5e-7, 1e-6, 1e-6, 1e-6])
    assert _lrs(OptimConfig(lr=1e-6, schedule="constant"), 3) == pytest.approx([1e-6] * 3)
    # cosine over 5 steps without warmup down to 0: 1, (1 + cos(pi/5)) / 2 = 0.904508, ...
    cos = _lrs(OptimConfig(lr=1.0, schedule="cosine"), 5)
    assert cos[:2] == pytest.approx([1.0, 0.904508], abs=1e-6)


def test_weight_decay_on_matrices_only():
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, OptimConfig(weight_decay=0.01))
    decays = sorted((len(g["params"]), g["weight_decay"]) for g in opt.param_groups)
    assert decays == [(1, 0.0), (1, 0.01)]  # the bias (1-D) is not decayed
