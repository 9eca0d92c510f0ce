"""Hostile model output through the whole session path: one agent's bad text costs only that agent."""

from membuilder.agents.apply import apply_agent_outputs
from membuilder.bank import MemoryBank
from membuilder.operations import Add, CoreAppend
from membuilder.store import SQLiteStore
from membuilder.types import MemoryKind


def _ops(body: str) -> str:
    return '{"operations": [' + body + "]}"


def test_lone_surrogate_invalidates_one_agent_and_the_others_reach_sqlite(tmp_path, clock):
    # before the fix, "\ud83d" passed the parser and the gate, then the SQLite write raised
    # UnicodeEncodeError and the whole session (all four agents) was lost
    outputs = {
        "core": '{"action": "APPEND", "content": "Ann has a cat."}',
        "episodic": _ops('{"action": "ADD", "memory": "Ann laughed \\ud83d"}'),
        "semantic": _ops('{"action": "ADD", "memory": "Ann lives in Oslo."}'),
        "procedural": _ops('{"action": "ADD", "memory": "Ann brews tea for 4 minutes.", '
                           '"time": "0001-01-01T00:00:00+05:00"}'),  # overflows once made UTC
    }
    for drop in (False, True):  # builder mode and reward mode
        bank = MemoryBank(SQLiteStore(tmp_path / f"bank{drop}.sqlite"), "o", clock=clock)
        bank.apply([CoreAppend("Ann likes tea.")])
        out = apply_agent_outputs(bank, outputs, session_id="s1", drop_invalid_agents=drop)
        epi, pro = out.agents[MemoryKind.EPISODIC], out.agents[MemoryKind.PROCEDURAL]
        assert not epi.valid and "lone surrogate" in epi.error and epi.applied == ()
        assert not pro.valid and "out of range" in pro.error and pro.applied == ()
        assert out.agents[MemoryKind.SEMANTIC].valid and out.agents[MemoryKind.CORE].valid
        assert bank.core == "Ann likes tea.\nAnn has a cat."
        assert [e.text for e in bank.entries("semantic")] == ["Ann lives in Oslo."]
        assert bank.entries("episodic") == [] and bank.entries("procedural") == []
        assert out.agents[MemoryKind.SEMANTIC].applied == (Add("semantic", "Ann lives in Oslo."),)
