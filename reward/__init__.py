"""The session reward of DESIGN section 6, as a library: `score_session` / `make_reward_fn`.

    R(g, m) = v(g, m) * T(g) * (1 - lambda * l(g, m)),   weight alpha for the dominant kind's agent

Modules: `config` (RewardConfig), `validity`, `length`, `task` (answer + judge), `attribution`,
`overlay` (copy-on-write candidate banks), `score` (the entry points), `types` (the request and
result types shared with the server, the client and the trainer).
"""

from .config import RewardConfig
from .score import BaseCache, RewardService, make_reward_fn, score_session
from .types import (
    AGENTS,
    QA_TYPES,
    QAPair,
    RewardComputationError,
    RewardFn,
    RewardInputError,
    SampleReward,
    SessionReward,
    SessionRewardRequest,
)

__all__ = [
    "AGENTS", "BaseCache", "QAPair", "QA_TYPES", "RewardComputationError", "RewardConfig", "RewardFn",
    "RewardInputError", "RewardService", "SampleReward", "SessionReward", "SessionRewardRequest",
    "make_reward_fn", "score_session",
]
