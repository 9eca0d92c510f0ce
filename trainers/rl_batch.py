"""One ADRPO rollout batch as data: sessions, reward requests, samples, advantages, masks, TIS.

Pure bookkeeping, no model: `trainers/adrpo.py` composes these steps.

- `group_sessions`: RL rows (one per (session, agent)) -> sessions, each with its agents' rows;
  `epoch_order` / `step_sessions`: which sessions a step trains on (seeded, resumable).
- `build_requests`: a `SessionRollout` -> one `SessionRewardRequest` per session (candidate g =
  the g-th output of each agent).
- `collect_samples`: rollout + rewards -> one `Sample` per (session, agent, g), with the reason
  when it takes no part in the loss (reward masked, reward call failed, session without QA,
  empty completion, cut at the length limit when such samples are dropped).
- `assign_advantages`: `(R - mean) / (std + eps)` per (session, agent) group over its samples
  with a reward; groups whose rewards are all equal (or with fewer than 2 rewards) get 0 and are
  counted.
- `tis_weights`: truncated importance-sampling factors from the trainer's and the engine's
  temperature-1 log-probs, per token or per sequence, capped.
- `batch_metrics`: sums and counts describing the batch (reward and parts, validity per agent,
  dominant kinds, masked counts, answer length), to be summed over processes.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from reward.types import AGENTS, SessionReward, SessionRewardRequest
from rollout.session import AgentPrompt, SessionRollout
from rollout.types import Completion
from trainers.advantages import degenerate_groups, group_advantages
from trainers.data.rl_rows import RLRow


class MaskReason(str, enum.Enum):
    """Why a sample takes no part in the loss (also the metric name suffix)."""

    REWARD_MASKED = "reward_masked"  # the reward function masked it (its own reason is logged)
    REWARD_FAILED = "reward_failed"  # the reward call for its batch raised RewardComputationError
    NO_QA = "no_qa"  # its session has no QA pairs: nothing to score it on
    EMPTY = "empty"  # zero completion tokens: nothing to train on (its reward still counts)
    TRUNCATED = "truncated"  # cut at max_tokens, dropped because rollout.mask_truncated is set


# Reasons that leave the sample without a reward (so it is also out of its group's statistics).
NO_REWARD = (MaskReason.REWARD_MASKED, MaskReason.REWARD_FAILED, MaskReason.NO_QA)


# ---------------------------------------------------------------------------------------------
# Sessions and data order
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RLSession:
    """The rows of one session, one per agent, in `AGENTS` order."""

    key: str  # "conversation_id/session_id", unique in the set
    rows: tuple[RLRow, ...]

    @property
    def first(self) -> RLRow:
        return self.rows[0]


def group_sessions(rows: Sequence[RLRow], agents: Sequence[str] = AGENTS, split: str | None = "train") -> list[RLSession]:
    """Sessions in first-appearance order, keeping rows of `agents` (and `split`, unless None)."""
    unknown = sorted(set(agents) - set(AGENTS))
    if unknown:
        raise ValueError(f"unknown agents {unknown}; choose from {list(AGENTS)}")
    by_key: dict[str, list[RLRow]] = {}
    for row in rows:
        if row.agent not in agents or (split is not None and row.split != split):
            continue
        by_key.setdefault(f"{row.conversation_id}/{row.session_id}", []).append(row)
    sessions = []
    for key, rs in by_key.items():
        seen = [r.agent for r in rs]
        if len(set(seen)) != len(seen):
            raise ValueError(f"session {key} has more than one row for an agent: {seen}")
        first = rs[0]
        for r in rs[1:]:
            if (r.owner, r.snapshot_id) != (first.owner, first.snapshot_id):
                raise ValueError(f"session {key}: its rows disagree on owner / snapshot_id")
        sessions.append(RLSession(key, tuple(sorted(rs, key=lambda r: AGENTS.index(r.agent)))))
    return sessions


def epoch_order(num_sessions: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The session order of one epoch: a permutation fixed by (seed, epoch)."""
    order = list(range(num_sessions))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def step_sessions(order: Sequence[int], batch_in_epoch: int, per_step: int, rank: int, world: int) -> list[int]:
    """The sessions of step `batch_in_epoch` of an epoch that process `rank` rolls out.

    A step takes `per_step` consecutive sessions of the epoch order (the last batch of an epoch
    may be short); process r takes every world-th of them starting at r, so a session's G x 4
    samples stay on one process (its groups' advantages need no communication).
    """
    batch = list(order[batch_in_epoch * per_step : (batch_in_epoch + 1) * per_step])
    return batch[rank::world]


def agent_prompts(sessions: Sequence[RLSession]) -> list[AgentPrompt]:
    """One prompt per (session, agent), keyed by the session key."""
    return [AgentPrompt(s.key, r.agent, list(r.prompt)) for s in sessions for r in s.rows]


# ---------------------------------------------------------------------------------------------
# Reward requests and samples
# ---------------------------------------------------------------------------------------------


def build_requests(sessions: Sequence[RLSession], rollout: SessionRollout) -> list[SessionRewardRequest]:
    """One request per session: candidate g = the g-th completion of each of its agents."""
    requests = []
    for s in sessions:
        first = s.first
        candidates = rollout.candidates(s.key)
        requests.append(
            SessionRewardRequest(
                owner=first.owner,
                snapshot_id=first.snapshot_id,
                session_id=first.session_id,
                qa=first.qa,
                expert_tokens={r.agent: r.expert_tokens for r in s.rows},
                outputs=tuple({agent: c.text for agent, c in cand.items()} for cand in candidates),
                session_date=first.session_date,
                expert_outputs={r.agent: r.expert_output for r in s.rows},
            )
        )
    return requests


@dataclass
class Sample:
    """One completion of one (session, agent) prompt, with its reward and place in the loss."""

    group: int  # index of its (session, agent) group in the batch
    session: str
    agent: str
    index: int  # g, its candidate index
    completion: Completion
    reward: float | None = None  # None: no reward (see mask)
    task_reward: float | None = None
    length_penalty: float = 0.0
    valid: bool = False
    weight: float = 1.0  # attribution weight
    dominant_kind: str | None = None
    mask: MaskReason | None = None  # not None: no part in the loss
    mask_detail: str | None = None
    advantage: float = 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.completion.token_ids)

    @property
    def truncated(self) -> bool:
        return self.completion.finish_reason == "length"


def check_rewards(requests: Sequence[SessionRewardRequest], rewards: Sequence[SessionReward]) -> None:
    """Raise if a reward function's answer does not fit its requests (count, order, samples)."""
    if len(rewards) != len(requests):
        raise ValueError(f"the reward function returned {len(rewards)} results for {len(requests)} sessions")
    for req, rew in zip(requests, rewards, strict=True):
        if rew.session_id != req.session_id:
            raise ValueError(f"reward results out of order: got session {rew.session_id!r}, expected {req.session_id!r}")
        for agent in req.outputs[0] if req.outputs else ():
            for g in range(req.group_size):
                rew.sample(agent, g)  # KeyError names the missing sample


def collect_samples(
    sessions: Sequence[RLSession],
    rollout: SessionRollout,
    requests: Sequence[SessionRewardRequest],
    rewards: Sequence[SessionReward | None],
    *,
    failure: str | None = None,
    mask_truncated: bool = False,
) -> list[Sample]:
    """Every sample of the batch in (session, agent, g) order, its reward filled in or masked.

    `rewards[i]` is session i's reward, or None when it has none: no QA pairs (masked as NO_QA),
    or the reward call failed (`failure` says why; masked as REWARD_FAILED). A sample without a
    reward is never given a made-up one.
    """
    if len(rewards) != len(sessions) or len(requests) != len(sessions):
        raise ValueError(f"{len(sessions)} sessions, {len(requests)} requests, {len(rewards)} rewards")
    samples: list[Sample] = []
    group = 0
    for i, s in enumerate(sessions):
        for row in s.rows:
            for g, completion in enumerate(rollout.groups[(s.key, row.agent)]):
                sample = Sample(group, s.key, row.agent, g, completion)
                reward = rewards[i]
                if not requests[i].qa:
                    sample.mask, sample.mask_detail = MaskReason.NO_QA, "the session has no QA pairs"
                elif reward is None:
                    sample.mask, sample.mask_detail = MaskReason.REWARD_FAILED, failure
                else:
                    r = reward.sample(row.agent, g)
                    if r.masked or r.reward is None:
                        sample.mask = MaskReason.REWARD_MASKED
                        sample.mask_detail = r.mask_reason or "masked by the reward function"
                    else:
                        sample.reward, sample.task_reward = float(r.reward), r.task_reward
                        sample.length_penalty, sample.valid = float(r.length_penalty), bool(r.valid)
                        sample.weight, sample.dominant_kind = float(r.weight), r.dominant_kind
                        if sample.num_tokens == 0:
                            sample.mask = MaskReason.EMPTY
                        elif mask_truncated and sample.truncated:
                            sample.mask = MaskReason.TRUNCATED
                samples.append(sample)
            group += 1
    return samples


def assign_advantages(samples: Sequence[Sample], group_size: int, eps: float = 1e-6) -> dict[str, int]:
    """Set each sample's group-relative advantage in place; returns group counts.

    Samples without a reward take no part in their group's mean and std and get advantage 0.
    Empty or dropped-truncated samples keep their reward in the statistics (they were sampled
    from this policy like the others) but are not trained on.
    """
    if not samples:
        return {"groups": 0, "zero_variance": 0, "no_signal": 0}
    num_groups = samples[-1].group + 1
    rewards = torch.zeros(num_groups, group_size, dtype=torch.float64)
    valid = torch.zeros(num_groups, group_size, dtype=torch.bool)
    for s in samples:
        if s.reward is not None:
            rewards[s.group, s.index] = s.reward
            valid[s.group, s.index] = True
    adv = group_advantages(rewards, valid, eps)
    for s in samples:
        s.advantage = float(adv[s.group, s.index])
    flat = degenerate_groups(rewards, valid)
    enough = valid.sum(dim=1) >= 2
    return {
        "groups": num_groups,
        # All rewards equal among >= 2 scored samples: zero advantage (no relative signal).
        "zero_variance": int((flat & enough).sum()),
        # Fewer than 2 scored samples (masked): zero advantage too.
        "no_signal": int((~enough).sum()),
    }


# ---------------------------------------------------------------------------------------------
# Truncated importance sampling
# ---------------------------------------------------------------------------------------------


class TISLevel(str, enum.Enum):
    OFF = "off"
    TOKEN = "token"
    SEQUENCE = "sequence"


def tis_weights(
    trainer_logp: Tensor,  # [N] trainer's temperature-1 log-probs of the sampled tokens
    engine_logp: Tensor,  # [N] the engine's temperature-1 log-probs of the same tokens
    seq_index: Tensor,  # [N] long, sequence of each token
    num_seqs: int,
    level: TISLevel,
    cap: float,
) -> Tensor:  # [N] float32, detached
    """min(pi_trainer / pi_engine, cap) per token, or of the sequence's product, on each token.

    Rollouts come from the engine's distribution while the gradient is taken for the trainer's;
    the factor corrects for the difference, the cap bounds its variance (truncated importance
    sampling). Both log-probs are of the raw distribution (temperature 1), the only one the
    engine reports; tempering and top-p act on both alike.
    """
    if level is TISLevel.OFF:
        return torch.ones_like(trainer_logp, dtype=torch.float32)
    diff = (trainer_logp.double() - engine_logp.double()).detach()
    if level is TISLevel.SEQUENCE:
        per_seq = torch.zeros(num_seqs, dtype=torch.float64, device=diff.device).index_add_(0, seq_index, diff)
        diff = per_seq[seq_index]
    return torch.exp(diff.clamp(max=torch.log(torch.tensor(float(cap))).item())).float()


# ---------------------------------------------------------------------------------------------
# Batch metrics (sums and counts, summed over processes by the trainer)
# ---------------------------------------------------------------------------------------------

KINDS = AGENTS  # dominant kinds are memory kinds

# Roles other agent sets train (e.g. the long/short-term architecture's "splitter"), registered by
# their episode source when it is built. Every process builds the same source, so every process
# then reports the same per-role keys (their sums are all-reduced key by key).
_EXTRA_ROLES: list[str] = []


def register_roles(roles: Sequence[str]) -> None:
    """Add roles whose per-role metrics `batch_counts` reports (idempotent; order kept)."""
    for role in roles:
        if not isinstance(role, str) or not role or "/" in role:
            raise ValueError(f"a role name must be a non-empty string without '/', got {role!r}")
        if role not in AGENTS and role not in _EXTRA_ROLES:
            _EXTRA_ROLES.append(role)


def metric_roles() -> tuple[str, ...]:
    """The roles with per-role metrics: the four memory agents, then any registered role."""
    return (*AGENTS, *_EXTRA_ROLES)


@dataclass
class BatchCounts:
    """Additive statistics of a batch; `ratios()` turns their global sums into metrics."""

    values: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.values[key] = self.values.get(key, 0.0) + float(value)


def batch_counts(samples: Sequence[Sample], groups: dict[str, int], roles: Sequence[str] | None = None) -> BatchCounts:
    """Sums over the batch's samples with a fixed key set (every process must produce the same keys).

    Per-role keys are those of `roles` (default `metric_roles()`: the memory agents and the
    registered roles); a sample of any other role is an error rather than a key that other
    processes may not have.
    """
    c = BatchCounts()
    roles = tuple(metric_roles() if roles is None else roles)
    keys = ["samples", "scored", "reward_sum", "task_sum", "task_n", "valid_sum", "penalty_sum", "tokens_sum"]
    keys += ["truncated", "trained"] + [f"masked_{m.value}" for m in MaskReason]
    keys += [f"{k}_{a}" for a in roles for k in ("scored", "valid", "reward_sum")]
    keys += [f"dominant_{k}" for k in KINDS] + ["dominant_none", "groups", "zero_variance", "no_signal"]
    for k in keys:
        c.values[k] = 0.0
    for k in ("groups", "zero_variance", "no_signal"):
        c.add(k, groups.get(k, 0))
    candidates: set[tuple[str, int]] = set()
    unknown = sorted({s.agent for s in samples} - set(roles))
    if unknown:
        raise ValueError(f"samples of roles {unknown} have no metric keys (roles: {list(roles)}); register them "
                         "with trainers.rl_batch.register_roles")
    for s in samples:
        c.add("samples", 1)
        c.add("tokens_sum", s.num_tokens)
        c.add("truncated", int(s.truncated))
        if s.mask is not None:
            c.add(f"masked_{s.mask.value}", 1)
        if s.mask is None:
            c.add("trained", 1)
        if s.reward is None:
            continue
        c.add("scored", 1)
        c.add("reward_sum", s.reward)
        c.add("valid_sum", int(s.valid))
        c.add("penalty_sum", s.length_penalty)
        if s.task_reward is not None:
            c.add("task_sum", s.task_reward)
            c.add("task_n", 1)
        c.add(f"scored_{s.agent}", 1)
        c.add(f"valid_{s.agent}", int(s.valid))
        c.add(f"reward_sum_{s.agent}", s.reward)
        # The dominant kind is a property of the candidate: count it once per (session, g).
        if (s.session, s.index) not in candidates:
            candidates.add((s.session, s.index))
            kind = s.dominant_kind if s.dominant_kind in KINDS else "none"
            c.add(f"dominant_{kind}", 1)
    return c


def counts_to_metrics(v: dict[str, float]) -> dict[str, float]:
    """Metric rows from summed `BatchCounts.values` (NaN where nothing was scored)."""

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else float("nan")

    m = {
        "reward/mean": ratio(v["reward_sum"], v["scored"]),
        "reward/task_mean": ratio(v["task_sum"], v["task_n"]),
        "reward/valid_rate": ratio(v["valid_sum"], v["scored"]),
        "reward/length_penalty_mean": ratio(v["penalty_sum"], v["scored"]),
        "rollout/answer_tokens_mean": ratio(v["tokens_sum"], v["samples"]),
        "rollout/truncated_frac": ratio(v["truncated"], v["samples"]),
        "batch/samples": v["samples"],
        "batch/trained_samples": v["trained"],
        "batch/groups": v["groups"],
        "batch/zero_variance_groups": v["zero_variance"],
        "batch/no_signal_groups": v["no_signal"],
    }
    for reason in MaskReason:
        m[f"batch/masked_{reason.value}"] = v[f"masked_{reason.value}"]
    # Every role whose keys were summed (the memory agents, and any role a source registered).
    roles = [k[len("scored_"):] for k in v if k.startswith("scored_")]
    for a in roles:
        if v[f"scored_{a}"] > 0:
            m[f"reward/{a}/mean"] = v[f"reward_sum_{a}"] / v[f"scored_{a}"]
            m[f"reward/{a}/valid_rate"] = v[f"valid_{a}"] / v[f"scored_{a}"]
    candidates = sum(v[f"dominant_{k}"] for k in (*KINDS, "none"))
    for k in (*KINDS, "none"):
        m[f"attribution/dominant_{k}"] = ratio(v[f"dominant_{k}"], candidates)
    return m
