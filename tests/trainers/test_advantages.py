"""Hand-computed group advantages (unbiased std) and their expansion to tokens."""

import math

import pytest
import torch

from trainers.advantages import degenerate_groups, expand_to_tokens, group_advantages


def test_binary_group_uses_unbiased_std():
    # R = [1, 0, 0, 1]: mean 0.5, deviations +-0.5, unbiased variance 4 * 0.25 / 3 = 1/3,
    # std 0.577350; A = +-0.5 / (0.577350 + 1e-6) = +-0.866024.
    # (The population std, 0.5, would give +-1.)
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    torch.testing.assert_close(adv, torch.tensor([[0.866024, -0.866024, -0.866024, 0.866024]]), atol=2e-6, rtol=0)


def test_two_samples_distinguish_unbiased_from_population():
    # R = [0, 1]: unbiased std sqrt(0.5) = 0.707107 -> A = -+0.5 / 0.707108 = -+0.707106.
    adv = group_advantages(torch.tensor([[0.0, 1.0]]))
    torch.testing.assert_close(adv, torch.tensor([[-0.707106, 0.707106]]), atol=2e-6, rtol=0)
    assert abs(adv[0, 1].item()) < 0.9  # not 1.0, the population-std value


def test_masked_sample_is_left_out_and_gets_zero():
    # Valid R = [1, 0, 0.5] (the 4th failed, its reward is NaN): mean 0.5, deviations
    # [0.5, -0.5, 0], unbiased variance 0.5 / 2 = 0.25, std 0.5 -> A = [1, -1, 0] / (1 + 2e-6).
    rewards = torch.tensor([[1.0, 0.0, 0.5, float("nan")]])
    valid = torch.tensor([[True, True, True, False]])
    adv = group_advantages(rewards, valid)
    torch.testing.assert_close(adv, torch.tensor([[0.999998, -0.999998, 0.0, 0.0]]), atol=1e-6, rtol=0)


def test_groups_are_independent_and_degenerate_ones_are_zero():
    rewards = torch.tensor(
        [
            [0.3, 0.3, 0.3, 0.3],  # zero variance (0.3 is not exact in binary: still all zeros)
            [0.2, 0.9, 0.9, 0.9],  # valid ones all equal once the 0.2 is masked
            [0.0, 0.7, 0.1, 0.4],  # only one valid sample
            [2.0, 4.0, 6.0, 8.0],  # mean 5, unbiased std sqrt(20 / 3) = 2.581989
        ]
    )
    valid = torch.tensor(
        [[True, True, True, True], [False, True, True, True], [False, True, False, False], [True] * 4]
    )
    adv = group_advantages(rewards, valid)
    assert torch.equal(adv[:3], torch.zeros(3, 4))
    # [-3, -1, 1, 3] / 2.581990 = [-1.161895, -0.387298, 0.387298, 1.161895]
    torch.testing.assert_close(adv[3], torch.tensor([-1.161895, -0.387298, 0.387298, 1.161895]), atol=2e-6, rtol=0)
    assert degenerate_groups(rewards, valid).tolist() == [True, True, True, False]


def test_advantages_sum_to_zero_over_valid_samples():
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(16, 8, generator=g)
    valid = torch.rand(16, 8, generator=g) > 0.2
    adv = group_advantages(rewards, valid)
    assert torch.allclose(adv.sum(dim=1), torch.zeros(16), atol=1e-5)
    assert (adv[~valid] == 0).all()


def test_eps_enters_the_denominator():
    # R = [0, 1] with eps = 0.292893 (= 1 - std): A = -+0.5 / 1.0.
    adv = group_advantages(torch.tensor([[0.0, 1.0]]), eps=1.0 - math.sqrt(0.5))
    torch.testing.assert_close(adv, torch.tensor([[-0.5, 0.5]]))


def test_expand_to_tokens():
    values = torch.tensor([0.5, -2.0])
    mask = torch.tensor([[False, True, True], [True, False, False]])
    assert expand_to_tokens(values, mask).tolist() == [[0.0, 0.5, 0.5], [-2.0, 0.0, 0.0]]


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="num_groups, G"):
        group_advantages(torch.zeros(8))
    with pytest.raises(ValueError, match="valid must be"):
        group_advantages(torch.zeros(2, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="per_sample"):
        expand_to_tokens(torch.zeros(3), torch.ones(2, 4, dtype=torch.bool))
