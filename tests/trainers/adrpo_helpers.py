"""Scaffolding for the ADRPO tests: a tiny RL set, a target-token reward, a config.

The reward is a small, exactly computable task a 0.9M-parameter model can learn in a few dozen
steps: each agent output is valid when it holds at least one target token, the task reward of a
candidate is the share of target tokens over its agents' outputs, and R = v * T (no length
penalty). The dominant kind is the agent with the most target tokens (ties: first in agent
order), whose samples get weight `alpha`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from reward.types import AGENTS, QAPair, RewardComputationError, SampleReward, SessionReward, SessionRewardRequest
from trainers.adrpo_config import ADRPOConfig
from trainers.config import load_config
from trainers.data.rl_rows import RLRow

# 32 ids of merged tokens of the tiny tokenizer (it has ~580 real tokens; a fresh model emits
# these about 3% of the time, and re-encoding its decoded text finds them again).
TARGET_IDS = tuple(range(300, 332))


def tiny_rl_rows(
    num_sessions: int = 4, agents: Sequence[str] = ("core", "episodic"), qa: bool = True, split: str = "train"
) -> list[RLRow]:
    rows = []
    for s in range(num_sessions):
        for agent in agents:
            rows.append(
                RLRow(
                    row_id=f"conv{s // 2}/s{s}/{agent}",
                    conversation_id=f"conv{s // 2}",
                    owner=f"user{s // 2}",
                    session_id=f"s{s}",
                    session_index=s % 2,
                    session_date="2023-05-08",
                    agent=agent,
                    prompt=(
                        {"role": "system", "content": f"You are the {agent} memory agent."},
                        {"role": "user", "content": f"Caroline: Hey Mel! Session {s}. Write the memory."},
                    ),
                    snapshot_id="0" * 64,
                    qa=(QAPair("Who said hey?", "Caroline"),) if qa else (),
                    expert_output='{"operations": []}',
                    expert_tokens=6,
                    split=split,
                )
            )
    return rows


class TargetTokenReward:
    """A `RewardFn` scoring outputs by their share of target tokens (module docstring)."""

    def __init__(self, tokenizer, target_ids: Iterable[int] = TARGET_IDS, alpha: float = 1.0, fail_calls: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.targets = frozenset(target_ids)
        self.alpha = alpha
        self.fail_calls = set(fail_calls)  # call numbers (0-based) that raise RewardComputationError
        self.calls = 0
        self.requests: list[SessionRewardRequest] = []

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, requests: Sequence[SessionRewardRequest]) -> list[SessionReward]:
        call, self.calls = self.calls, self.calls + 1
        self.requests.extend(requests)
        if call in self.fail_calls:
            raise RewardComputationError("judge unavailable (test)")
        out = []
        for req in requests:
            samples = []
            for g, candidate in enumerate(req.outputs):
                hits = {a: sum(t in self.targets for t in self._ids(text)) for a, text in candidate.items()}
                total = sum(len(self._ids(text)) for text in candidate.values())
                task = sum(hits.values()) / total if total else 0.0
                agents = [a for a in AGENTS if a in candidate]
                dominant = max(agents, key=lambda a: (hits[a], -agents.index(a))) if any(hits.values()) else None
                for a in agents:
                    valid = hits[a] > 0
                    samples.append(
                        SampleReward(
                            agent=a, index=g, valid=valid, task_reward=task, length_penalty=0.0,
                            reward=float(valid) * task, weight=self.alpha if a == dominant else 1.0,
                            dominant_kind=dominant,
                        )
                    )
            out.append(SessionReward(req.session_id, tuple(samples)))
        return out


def tiny_config(model_path: Path, output_dir: Path, *overrides: str) -> ADRPOConfig:
    return load_config(
        ADRPOConfig,
        overrides=[
            f"model.path={model_path}",
            f"checkpoint.output_dir={output_dir}",
            "data.sessions_per_step=2",
            "rollout.group_size=4",
            "rollout.max_tokens=8",
            "train.max_steps=2",
            "train.gradient_checkpointing=false",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
            *overrides,
        ],
    )
