"""What an ADRPO step trains on: a source of episodes the trainer draws from.

The trainer knows nothing of memory agents. Each step it takes the indices of the step's data
units (sessions, whole conversations, dialogue chunks: whatever the source counts) and asks the
source for the step's scored samples:

    source.collect(indices, engine, params, step=step) -> Episodes

`Episodes.samples` are `trainers.rl_batch.Sample`s in group order: group ids 0, 1, ... with the
samples of a group consecutive and `sample.index < group_size`. The group is the set advantages
are computed over (G samples of one prompt, or G trajectories of one conversation); samples of a
group need not share a prompt (the trainer packs consecutive samples that do). A sample without
a reward carries its `mask` and reason, never a made-up reward.

`SessionEpisodes` is MemBuilder's dense ADRPO: one group per (session, agent), G candidates of a
session scored together by the session reward. Other agent sets and reward schemes (sparse
conversation rewards, the long/short-term architecture) are other sources handed to
`ADRPOTrainer(cfg, episodes=...)`.

Errors: a `RewardComputationError` (answerer or judge down after retries) masks the samples it
concerns and training goes on; `OSError` / `ConnectionError` from the engine or a remote reward
are re-raised by the trainer as a clear stop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from reward.types import RewardComputationError, RewardFn, SessionReward, SessionRewardRequest
from rollout.session import rollout_sessions
from rollout.types import RolloutEngine, SamplingParams
from trainers.config import ConfigError
from trainers.rl_batch import RLSession, Sample, agent_prompts, build_requests, check_rewards, collect_samples

if TYPE_CHECKING:
    from trainers.adrpo_config import ADRPOConfig

logger = logging.getLogger(__name__)


@dataclass
class Episodes:
    """One step's scored samples (this process's share)."""

    samples: list[Sample]
    group_size: int
    # Additive counts the source wants logged (as `episodes/<key>`): summed over processes, so
    # every process must report the same keys.
    counts: dict[str, float] = field(default_factory=dict)
    # Seconds per phase as the source measured them (e.g. rollout, reward), logged as `time/<key>_s`.
    times: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class EpisodeSource(Protocol):
    """A data set the trainer walks through in a seeded, resumable order, one unit index at a time."""

    def __len__(self) -> int: ...

    def collect(self, indices: Sequence[int], engine: RolloutEngine, params: SamplingParams, *, step: int) -> Episodes: ...


def score_requests(
    reward_fn: RewardFn, requests: Sequence[SessionRewardRequest], *, step: int
) -> tuple[list[SessionReward | None], str | None]:
    """Rewards of the requests that have QA; None for the others and, on a reward failure, for all.

    A `RewardComputationError` masks the batch (the reason is returned and logged) and training
    goes on; any other error (a reward server that is gone) propagates.
    """
    scored = [i for i, r in enumerate(requests) if r.qa]
    out: list[SessionReward | None] = [None] * len(requests)
    if not scored:
        return out, None
    subset = [requests[i] for i in scored]
    try:
        rewards = reward_fn(subset)
    except RewardComputationError as exc:
        logger.warning("step %d: the reward failed for %d sessions (%s); their samples are masked", step, len(subset), exc)
        return out, f"reward failed: {exc}"
    check_rewards(subset, rewards)
    for i, reward in zip(scored, rewards, strict=True):
        out[i] = reward
    return out, None


class SessionEpisodes:
    """Dense ADRPO over sessions: G samples per (session, agent) prompt, candidate g of a session =
    the g-th output of each agent, scored by the session reward (DESIGN section 7)."""

    def __init__(self, sessions: Sequence[RLSession], reward_fn: RewardFn, *, mask_truncated: bool = False):
        self.sessions = list(sessions)
        self.reward_fn = reward_fn
        self.mask_truncated = mask_truncated

    def __len__(self) -> int:
        return len(self.sessions)

    def collect(self, indices: Sequence[int], engine: RolloutEngine, params: SamplingParams, *, step: int) -> Episodes:
        sessions = [self.sessions[i] for i in indices]
        started = time.perf_counter()
        rollout = rollout_sessions(engine, agent_prompts(sessions), params)
        rolled = time.perf_counter()
        requests = build_requests(sessions, rollout)
        rewards, failure = score_requests(self.reward_fn, requests, step=step)
        samples = collect_samples(sessions, rollout, requests, rewards, failure=failure, mask_truncated=self.mask_truncated)
        return Episodes(samples, params.n, times={"rollout": rolled - started, "reward": time.perf_counter() - rolled})


@dataclass(frozen=True)
class SourceContext:
    """What a configured episode source is built from (the trainer fills it in)."""

    cfg: "ADRPOConfig"
    output_dir: Path  # the run's folder (prepared data may go under it)
    base_path: Path  # the policy's base model folder (its tokenizer counts expert lengths)
    snapshots_dir: Path | None  # `data.snapshots`, if set
    is_main_process: bool


def configured_source(ctx: SourceContext) -> EpisodeSource | None:
    """The episode source `cfg` asks for, or None for the default (dense sessions of the RL set)."""
    cfg = ctx.cfg
    if cfg.data.architecture == "membuilder" and cfg.reward.dense:
        return None
    if cfg.data.architecture == "membuilder" and not cfg.reward.dense:
        # The paper's sparse ablation, on policy: whole-conversation trajectories.
        from trainers.conversation_episodes import conversation_source

        return conversation_source(ctx)
    if cfg.data.architecture == "longshort" and cfg.reward.dense:
        from trainers.longshort_episodes import configured_longshort_source

        return configured_longshort_source(ctx)
    raise ConfigError(
        f"data.architecture={cfg.data.architecture!r} with reward.dense={cfg.reward.dense} is not supported"
    )
