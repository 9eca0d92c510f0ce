"""GRPO with the fused loss teaches a tiny model to emit target tokens (single process)."""

import pytest
import torch

from tests.trainers.grpo_toy import run_toy_grpo, target_share_reward
from trainers.tiny import build_tiny_policy


def test_target_share_reward():
    completions = torch.tensor([[5, 7, 5, 1], [2, 2, 2, 2]])
    # row 0: tokens 5, 5, 7 are targets -> 3/4; row 1: none -> 0
    assert target_share_reward(completions, torch.tensor([5, 7])).tolist() == [0.75, 0.0]


@pytest.mark.slow
def test_mean_reward_rises():
    torch.manual_seed(0)
    model, tokenizer = build_tiny_policy(seed=0)
    # 32 of the 1,024 ids: an untrained model emits them about 3% of the time.
    result = run_toy_grpo(
        model, tokenizer, steps=20, target_ids=range(100, 132), group_size=8, max_new_tokens=12,
        lr=3e-3, updates_per_batch=2, seed=0,
    )
    first = sum(result.mean_rewards[:5]) / 5
    last = sum(result.mean_rewards[-5:]) / 5
    assert first < 0.1
    assert last > first + 0.2, result.mean_rewards
    # Two updates per batch: the second one is off-policy, so the ratio moved and clipped.
    assert any(m["clip_frac_low"] + m["clip_frac_high"] > 0 for m in result.metrics)
