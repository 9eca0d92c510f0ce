"""Shared scaffolding of the reward tests: a small state before, its snapshot, requests."""

from __future__ import annotations

import json

from membuilder.bank import MemoryBank
from membuilder.operations import Add, CoreAppend
from membuilder.snapshots import SnapshotStore
from membuilder.store import InMemoryStore
from reward.types import QAPair, SessionRewardRequest


def words(text: str) -> int:
    """The tests' token counter: whitespace-separated pieces (hand-countable)."""
    return len(text.split())


def state_before(owner: str = "conv-1", embedder=None, extra: int = 0):
    """Core "Ann likes tea.", S1 green tea, E2 Paris trip (2022-06-01), then `extra` filler entries."""
    bank = MemoryBank(InMemoryStore(), owner, embedder=embedder, clock=lambda: 1.0)
    bank.apply([CoreAppend("Ann likes tea."), Add("semantic", "Ann likes green tea."),
                Add("episodic", "Ann went to Paris in 2022.", "2022-06-01")]
               + [Add("procedural", f"Routine number {i}: stretch then run.") for i in range(extra)])
    return bank.snapshot()


def put_state(tmp_path, **kw) -> tuple[SnapshotStore, str]:
    store = SnapshotStore(tmp_path / "snapshots")
    return store, store.put(state_before(**kw))


QA = (QAPair("Which city did Ann visit in 2022?", "Paris", "cross-session", question_date="2023-05-08"),
      QAPair("What did Ann name her new bike?", "Rocket", "single-session", question_date="2023-05-08"))

EMPTY = '{"operations": []}'
CORE_NOOP = '{"operations": []}'
BIKE = json.dumps({"operations": [{"action": "ADD", "memory": "Ann named her new bike Rocket."}]})
RIDE = json.dumps({"operations": [{"action": "ADD", "memory": "Ann rode her new bike Rocket to work.",
                                   "time": "2023-05-07"}]})


def outputs(core=CORE_NOOP, episodic=EMPTY, semantic=EMPTY, procedural=EMPTY) -> dict:
    return {"core": core, "episodic": episodic, "semantic": semantic, "procedural": procedural}


def ops(*memories: str, action: str = "ADD") -> str:
    return json.dumps({"operations": [{"action": action, "memory": m} for m in memories]})


def request(snapshot_id: str, cands: list[dict], *, qa=QA, owner="conv-1", expert_tokens=None,
            expert_outputs=None, session_id="session_2", session_date="2023-05-08") -> SessionRewardRequest:
    tokens = expert_tokens or {"core": 0, "episodic": 0, "semantic": 0, "procedural": 0}
    return SessionRewardRequest(owner=owner, snapshot_id=snapshot_id, session_id=session_id, qa=tuple(qa),
                                expert_tokens=tokens, outputs=tuple(cands), session_date=session_date,
                                expert_outputs=expert_outputs)
