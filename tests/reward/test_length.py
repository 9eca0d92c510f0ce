"""Both length penalties, every branch, with the paper's thresholds (hand-computed)."""

import pytest

from reward.config import RewardConfig
from reward.length import core_length_penalty, ratio_length_penalty

C = RewardConfig()


@pytest.mark.parametrize("growth, expected", [
    (-500, 0.0),    # a REWRITE that shrinks the block is free
    (0, 0.0),
    (150, 0.0),     # up to theta_min = 150: free
    (151, 1 / 250),  # (151 - 150) / (400 - 150)
    (275, 0.5),     # (275 - 150) / 250
    (399, 249 / 250),
    (400, 1.0),     # from theta_max = 400: full
    (10_000, 1.0),
])
def test_core_penalty(growth, expected):
    assert core_length_penalty(growth, C) == pytest.approx(expected)


@pytest.mark.parametrize("model, expert, expected", [
    (100, 100, 0.0),    # equal lengths: never penalised (REFERENCE item 18's x0.32 is gone)
    (399, 200, 0.0),    # differ by 199 < min_diff = 200
    (199, 0, 0.0),      # empty expert answer: outputs under 200 tokens are free
    (200, 0, 1.0),      # ... and from 200 tokens fully penalised (r infinite)
    (1300, 1000, 0.0),  # differ by 300, r = 1.3 = gamma_u: inside the band
    (500, 1000, 0.0),   # r = 0.5 = gamma_l: inside the band
    (1650, 1000, 0.5),  # r = 1.65: (1.65 - 1.3) / (2.0 - 1.3) = 0.35 / 0.7
    (2000, 1000, 1.0),  # r = 2.0 = upper
    (5000, 1000, 1.0),  # r > 2: capped at 1
    (350, 1000, 0.5),   # r = 0.35: (0.5 - 0.35) / (0.5 - 0.2) = 0.15 / 0.3
    (200, 1000, 1.0),   # r = 0.2 = lower
    (0, 1000, 1.0),     # r = 0: capped at 1
])
def test_ratio_penalty(model, expert, expected):
    assert ratio_length_penalty(model, expert, C) == pytest.approx(expected)


def test_thresholds_are_configurable_and_checked():
    cfg = RewardConfig(theta_min=10, theta_max=20, min_diff=0)
    assert core_length_penalty(15, cfg) == pytest.approx(0.5)
    assert ratio_length_penalty(13, 10, cfg) == 0.0 and ratio_length_penalty(14, 10, cfg) > 0
    with pytest.raises(ValueError, match="theta_min < theta_max"):
        RewardConfig(theta_min=400, theta_max=150)
    with pytest.raises(ValueError, match="lower < gamma_l"):
        RewardConfig(gamma_l=0.1)
    with pytest.raises(ValueError, match="lam must lie"):
        RewardConfig(lam=1.5)
    with pytest.raises(ValueError, match="tie_order"):
        RewardConfig(tie_order=("episodic", "semantic"))
    with pytest.raises(ValueError, match="must be >= 0"):
        ratio_length_penalty(-1, 3, C)
