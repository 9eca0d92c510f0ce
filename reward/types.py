"""The reward's request and result types: the contract between data, reward, server and trainer.

A `SessionRewardRequest` carries everything needed to score the G candidates of one session:
the id of the expert's state-before snapshot (`membuilder.snapshots`), the session's QA, the
expert answers' lengths in policy tokens, and the G x 4 raw agent outputs. `score_session`
(`reward.score`) and `reward.client.RemoteReward` both take a list of requests and return one
`SessionReward` per request, in order: the trainer's `reward_fn` has exactly that signature.

Everything here is JSON-round-trippable (`to_dict` / `from_dict`), so the reward server and the
RL Parquet set use the same shapes. `from_dict` validates and raises `RewardInputError` naming
the bad field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

AGENTS = ("core", "episodic", "semantic", "procedural")
QA_TYPES = ("single-session", "cross-session", "temporal", "knowledge-update", "abstention", "other")


class RewardInputError(ValueError):
    """A reward request (or part of one) is malformed; the message names the field."""


class RewardComputationError(RuntimeError):
    """A reward could not be computed (answerer / judge failure, timeout). Never turned into a value."""


def _req(d: Mapping[str, Any], key: str, types: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, Mapping):
        raise RewardInputError(f"{where} must be an object, got {type(d).__name__}")
    if key not in d:
        raise RewardInputError(f"{where}.{key} is missing")
    value = d[key]
    if not isinstance(value, types) or isinstance(value, bool) and bool not in (
            types if isinstance(types, tuple) else (types,)):
        raise RewardInputError(f"{where}.{key} must be {types}, got {type(value).__name__}")
    return value


def _opt_str(d: Mapping[str, Any], key: str, where: str) -> str | None:
    value = d.get(key)
    if value is not None and not isinstance(value, str):
        raise RewardInputError(f"{where}.{key} must be a string or null, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class QAPair:
    """One session-level question with its gold answer.

    `question_date` is an ISO date or datetime (the date the question is asked; given to the
    answerer). `qtype` is one of `QA_TYPES`; `source` says where it came from ("world",
    "locomo-evidence", "longmemeval-evidence", "llm:<model>").
    """

    question: str
    answer: str
    qtype: str = "other"
    source: str = ""
    question_date: str | None = None
    question_id: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.question, str) or not self.question.strip():
            raise RewardInputError("qa.question must be a non-empty string")
        if not isinstance(self.answer, str):
            raise RewardInputError("qa.answer must be a string")
        if self.qtype not in QA_TYPES:
            raise RewardInputError(f"qa.qtype must be one of {QA_TYPES}, got {self.qtype!r}")

    def to_dict(self) -> dict:
        return {"question": self.question, "answer": self.answer, "qtype": self.qtype,
                "source": self.source, "question_date": self.question_date,
                "question_id": self.question_id}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "qa") -> "QAPair":
        return cls(question=_req(d, "question", str, where), answer=_req(d, "answer", str, where),
                   qtype=_opt_str(d, "qtype", where) or "other", source=_opt_str(d, "source", where) or "",
                   question_date=_opt_str(d, "question_date", where),
                   question_id=_opt_str(d, "question_id", where) or "")


@dataclass(frozen=True)
class SessionRewardRequest:
    """Score the G candidates of one session.

    - `owner`: the bank owner that holds the pre-session memory (search runs under it);
    - `snapshot_id`: the content-addressed id of the expert's state before the session;
    - `session_id`, `session_date`: recorded on the entries the candidates create;
    - `qa`: the session's QA pairs (empty -> every sample is masked, never scored 0);
    - `expert_tokens`: agent -> length of the expert's answer in policy tokens;
    - `outputs`: G candidates, each agent -> raw text of that agent's g-th sample;
    - `expert_outputs`: agent -> the expert's raw answer (only needed for counterfactual
      attribution).
    """

    owner: str
    snapshot_id: str
    session_id: str
    qa: tuple[QAPair, ...]
    expert_tokens: Mapping[str, int]
    outputs: tuple[Mapping[str, str], ...]
    session_date: str | None = None
    expert_outputs: Mapping[str, str] | None = None

    @property
    def group_size(self) -> int:
        return len(self.outputs)

    def to_dict(self) -> dict:
        return {"owner": self.owner, "snapshot_id": self.snapshot_id, "session_id": self.session_id,
                "session_date": self.session_date, "qa": [q.to_dict() for q in self.qa],
                "expert_tokens": dict(self.expert_tokens), "outputs": [dict(o) for o in self.outputs],
                "expert_outputs": dict(self.expert_outputs) if self.expert_outputs is not None else None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "request") -> "SessionRewardRequest":
        qa = _req(d, "qa", list, where)
        outputs = _req(d, "outputs", list, where)
        expert_tokens = _req(d, "expert_tokens", dict, where)
        for agent, n in expert_tokens.items():
            if agent not in AGENTS:
                raise RewardInputError(f"{where}.expert_tokens has unknown agent {agent!r}")
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise RewardInputError(f"{where}.expert_tokens.{agent} must be an integer >= 0")
        parsed_outputs = []
        for g, out in enumerate(outputs):
            if not isinstance(out, dict):
                raise RewardInputError(f"{where}.outputs[{g}] must be an object agent -> text")
            for agent, text in out.items():
                if agent not in AGENTS:
                    raise RewardInputError(f"{where}.outputs[{g}] has unknown agent {agent!r}")
                if not isinstance(text, str):
                    raise RewardInputError(f"{where}.outputs[{g}].{agent} must be a string")
            parsed_outputs.append(dict(out))
        expert_outputs = d.get("expert_outputs")
        if expert_outputs is not None and (not isinstance(expert_outputs, dict) or not all(
                a in AGENTS and isinstance(t, str) for a, t in expert_outputs.items())):
            raise RewardInputError(f"{where}.expert_outputs must map agents to strings")
        return cls(owner=_req(d, "owner", str, where), snapshot_id=_req(d, "snapshot_id", str, where),
                   session_id=_req(d, "session_id", str, where),
                   qa=tuple(QAPair.from_dict(q, f"{where}.qa[{i}]") for i, q in enumerate(qa)),
                   expert_tokens=dict(expert_tokens), outputs=tuple(parsed_outputs),
                   session_date=_opt_str(d, "session_date", where), expert_outputs=expert_outputs)


@dataclass(frozen=True)
class SampleReward:
    """The reward of one sample (agent `agent`, candidate `index`) and its parts.

    When `masked` is True the reward could not be computed (`mask_reason` says why) and
    `task_reward` / `reward` are None: the sample takes no part in the loss.
    """

    agent: str
    index: int
    valid: bool
    task_reward: float | None
    length_penalty: float
    reward: float | None
    weight: float
    dominant_kind: str | None
    retrieval_counts: Mapping[str, int] = field(default_factory=dict)
    masked: bool = False
    mask_reason: str | None = None
    invalid_reason: str | None = None
    output_tokens: int = 0

    def to_dict(self) -> dict:
        return {"agent": self.agent, "index": self.index, "valid": self.valid,
                "task_reward": self.task_reward, "length_penalty": self.length_penalty,
                "reward": self.reward, "weight": self.weight, "dominant_kind": self.dominant_kind,
                "retrieval_counts": dict(self.retrieval_counts), "masked": self.masked,
                "mask_reason": self.mask_reason, "invalid_reason": self.invalid_reason,
                "output_tokens": self.output_tokens}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SampleReward":
        where = "sample"

        def num(key: str, default: float | None = None) -> float | None:
            v = d.get(key, default)
            if v is None:
                return None
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise RewardInputError(f"{where}.{key} must be a finite number or null, got {v!r}")
            return float(v)

        def flag(key: str) -> bool:
            v = d.get(key, False)
            if not isinstance(v, bool):
                raise RewardInputError(f"{where}.{key} must be true or false, got {v!r}")
            return v

        counts = d.get("retrieval_counts") or {}
        if not isinstance(counts, dict) or not all(
                isinstance(k, str) and isinstance(n, int) and not isinstance(n, bool) and n >= 0
                for k, n in counts.items()):
            raise RewardInputError(f"{where}.retrieval_counts must map kinds to integers >= 0")
        tokens = d.get("output_tokens", 0)
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
            raise RewardInputError(f"{where}.output_tokens must be an integer >= 0, got {tokens!r}")
        length_penalty = num("length_penalty", 0.0)
        weight = num("weight", 1.0)
        if length_penalty is None or weight is None:
            raise RewardInputError(f"{where}.length_penalty and {where}.weight must be numbers")
        return cls(agent=_req(d, "agent", str, where), index=_req(d, "index", int, where),
                   valid=flag("valid"), task_reward=num("task_reward"), length_penalty=length_penalty,
                   reward=num("reward"), weight=weight, dominant_kind=_opt_str(d, "dominant_kind", where),
                   retrieval_counts=dict(counts), masked=flag("masked"),
                   mask_reason=_opt_str(d, "mask_reason", where),
                   invalid_reason=_opt_str(d, "invalid_reason", where), output_tokens=tokens)


@dataclass(frozen=True)
class SessionReward:
    """All G x 4 sample rewards of one session, plus per-candidate details."""

    session_id: str
    samples: tuple[SampleReward, ...]
    task_rewards: tuple[float | None, ...] = ()   # per candidate g
    elapsed_s: float = 0.0

    def sample(self, agent: str, index: int) -> SampleReward:
        for s in self.samples:
            if s.agent == agent and s.index == index:
                return s
        raise KeyError(f"no sample for agent {agent!r}, candidate {index}")

    def to_dict(self) -> dict:
        return {"session_id": self.session_id, "samples": [s.to_dict() for s in self.samples],
                "task_rewards": list(self.task_rewards), "elapsed_s": self.elapsed_s}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SessionReward":
        task_rewards = d.get("task_rewards") or []
        if not isinstance(task_rewards, list) or not all(
                t is None or isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)
                for t in task_rewards):
            raise RewardInputError("reward.task_rewards must be a list of finite numbers or nulls")
        elapsed = d.get("elapsed_s", 0.0)
        if not isinstance(elapsed, (int, float)) or isinstance(elapsed, bool) or not math.isfinite(elapsed):
            raise RewardInputError(f"reward.elapsed_s must be a finite number, got {elapsed!r}")
        return cls(session_id=_req(d, "session_id", str, "reward"),
                   samples=tuple(SampleReward.from_dict(s) for s in _req(d, "samples", list, "reward")),
                   task_rewards=tuple(None if t is None else float(t) for t in task_rewards),
                   elapsed_s=float(elapsed))


# What the trainer calls: many sessions in, one SessionReward per request out (same order).
RewardFn = Callable[[Sequence[SessionRewardRequest]], list[SessionReward]]
