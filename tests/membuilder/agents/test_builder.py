"""MemoryBuilder with in-process backends: one transaction, failures reported, nothing lost or doubled."""

import json
import threading

import pytest

from membuilder.agents import (
    AGENT_KINDS,
    AgentContext,
    AgentRecord,
    MemoryBuilder,
    SessionRecord,
)
from membuilder.bank import MemoryBank
from membuilder.datasets import Conversation
from membuilder.operations import Add, CoreAppend, CoreRewrite, Update
from membuilder.store import InMemoryStore
from membuilder.types import MemoryKind

from .conftest import make_session

SESSION = make_session([("Caroline", "I adopted a dog named Max yesterday!"),
                        ("Melanie", "Congrats! I bake bread every Sunday: flour, water, salt, 12 h rise.")])
EMPTY = '{"operations": []}'


class Scripted:
    """A plain `AgentBackend` (protocol only): answers from a dict kind -> text or exception."""

    name = "scripted"

    def __init__(self, answers, *, compress=None):
        self.answers = answers
        self.compress = compress
        self.calls = []
        self.lock = threading.Lock()

    def generate(self, kind, messages, *, context: AgentContext) -> str:
        with self.lock:
            self.calls.append((kind, context.purpose, messages))
        answer = self.compress if context.purpose == "compress" else self.answers.get(kind.value, EMPTY)
        if isinstance(answer, Exception):
            raise answer
        return answer


VALID = {
    "core": '{"action": "APPEND", "content": "Caroline has a dog named Max."}',
    "episodic": '{"operations": [{"action": "ADD", "memory": "Caroline adopted a dog named Max.", "time": "2023-05-07"}]}',
    "semantic": '{"operations": [{"action": "ADD", "memory": "Max is Caroline\'s dog."}]}',
    "procedural": '{"operations": [{"action": "ADD", "memory": "Melanie bakes bread: flour, water, salt; rise 12 h."}]}',
}


def _state(bank):
    return bank.core, sorted((e.id, e.kind.value, e.text, e.event_time, e.session_id) for e in bank.entries())


def test_valid_answers_are_applied_once_in_batch_order(bank):
    record = MemoryBuilder(Scripted(VALID)).add_session(bank, SESSION, session_index=3)
    # batch order is core, episodic, semantic, procedural; ids are numbered in that order
    assert _state(bank) == ("Caroline has a dog named Max.", [
        ("E1", "episodic", "Caroline adopted a dog named Max.", "2023-05-07", "session_1"),
        ("P3", "procedural", "Melanie bakes bread: flour, water, salt; rise 12 h.", None, "session_1"),
        ("S2", "semantic", "Max is Caroline's dog.", None, "session_1"),
    ])
    assert len(bank.history()) == 4  # one history record per change: nothing applied twice
    assert record.result.created == ("E1", "S2", "P3") and record.result.core_changed
    assert record.errors == {} and record.session_index == 3 and record.backend == "scripted"
    for kind in AGENT_KINDS:
        rec = record.agents[kind]
        assert rec.raw_output == VALID[kind.value] and rec.ok and rec.rejected == ()
        assert rec.operations == rec.parsed and len(rec.operations) == 1
    assert record.state_before.entries == () and record.state_before.meta.core == ""


def test_failed_and_unparsable_agents_are_reported_and_contribute_nothing(bank):
    answers = dict(VALID, episodic=RuntimeError("backend down"), semantic='{"operations": [{"action": "ADD"')
    record = MemoryBuilder(Scripted(answers)).add_session(bank, SESSION)
    assert record.errors[MemoryKind.EPISODIC] == "RuntimeError: backend down"
    assert record.errors[MemoryKind.SEMANTIC].startswith("unparsable answer: the output ends inside")
    assert record.agents[MemoryKind.SEMANTIC].raw_output == answers["semantic"]
    assert record.agents[MemoryKind.EPISODIC].raw_output is None
    # the other two agents' work is applied, and only theirs
    assert _state(bank) == ("Caroline has a dog named Max.", [
        ("P1", "procedural", "Melanie bakes bread: flour, water, salt; rise 12 h.", None, "session_1")])


def test_rejected_operations_are_dropped_with_reasons_and_the_rest_applied(bank):
    bank.apply([Add("semantic", "Max is a cat."), Add("episodic", "old event")])  # S1, E2
    answers = dict(VALID, semantic=json.dumps({"operations": [
        {"action": "UPDATE", "id": "S99", "new_memory": "x"},
        {"action": "UPDATE", "id": "E2", "new_memory": "wrong kind"},
        {"action": "UPDATE", "id": "S1", "new_memory": "Max is a dog."}]}),
        core='{"action": "REPLACE", "old_text": "not there", "new_text": "x"}')
    record = MemoryBuilder(Scripted(answers)).add_session(bank, SESSION)
    sem = record.agents[MemoryKind.SEMANTIC]
    assert sem.ok and len(sem.parsed) == 3
    assert sem.operations == (Update("semantic", "S1", "Max is a dog."),)
    assert sem.rejected == ("operations[0] UPDATE: no entry with id 'S99'",
                            "operations[1] UPDATE: entry 'E2' is episodic memory, not semantic")
    assert record.agents[MemoryKind.CORE].operations == ()
    assert "does not occur in core memory" in record.agents[MemoryKind.CORE].rejected[0]
    assert bank.get("S1").text == "Max is a dog." and bank.get("E2").text == "old event"
    assert bank.core == ""


def test_agents_run_concurrently(bank):
    barrier = threading.Barrier(4, timeout=10)  # passes only if the four agents are in flight together

    class Together(Scripted):
        def generate(self, kind, messages, *, context):
            barrier.wait()
            return super().generate(kind, messages, context=context)

    record = MemoryBuilder(Together(VALID), max_workers=4).add_session(bank, SESSION)
    assert record.errors == {}


def test_a_late_agent_times_out_and_its_answer_is_never_applied(bank):
    release = threading.Event()
    done = threading.Event()

    class Slow(Scripted):
        def generate(self, kind, messages, *, context):
            if kind is MemoryKind.SEMANTIC:
                release.wait(10)
                done.set()
            return super().generate(kind, messages, context=context)

    record = MemoryBuilder(Slow(VALID), agent_timeout_s=0.3).add_session(bank, SESSION)
    assert record.errors == {MemoryKind.SEMANTIC: "no answer within agent_timeout_s=0.3"}
    before = _state(bank)
    release.set()
    assert done.wait(10)
    assert _state(bank) == before and "S" not in "".join(e.id for e in bank.entries())


def test_over_limit_core_change_is_compressed_into_one_rewrite(clock):
    store = InMemoryStore()
    bank = MemoryBank(store, "o", clock=clock, core_limit=100)
    bank.apply([CoreAppend("a" * 80)])
    backend = Scripted(dict(VALID, core='{"action": "APPEND", "content": "' + "b" * 30 + '"}'),
                      compress='{"action": "REWRITE", "content": "a and b, compressed"}')
    record = MemoryBuilder(backend).add_session(bank, SESSION)
    core = record.agents[MemoryKind.CORE]
    # 80 + 1 (newline) + 30 = 111 > 100
    assert core.rejected == ("the core change would make the block 111 characters, over the limit of 100",)
    assert core.ok and core.operations == (CoreRewrite("a and b, compressed"),)
    assert core.compression.proposed_chars == 111 and core.compression.error is None
    assert "111 characters long" in core.compression.messages[0]["content"]
    assert [c[1] for c in backend.calls if c[0] is MemoryKind.CORE] == ["update", "compress"]
    assert bank.core == "a and b, compressed"


def test_failed_compression_leaves_core_unchanged_and_is_reported(clock):
    store = InMemoryStore()
    bank = MemoryBank(store, "o", clock=clock, core_limit=100)
    bank.apply([CoreAppend("a" * 80)])
    backend = Scripted(dict(VALID, core='{"action": "REWRITE", "content": "' + "c" * 150 + '"}'),
                      compress='{"action": "REWRITE", "content": "' + "d" * 120 + '"}')
    record = MemoryBuilder(backend).add_session(bank, SESSION)
    core = record.agents[MemoryKind.CORE]
    assert core.error == ("core change over the limit and compression failed: the REWRITE has 120 "
                          "characters, still over the limit of 100")
    assert core.operations == () and bank.core == "a" * 80
    assert len(bank.entries()) == 3  # the other agents were applied
    off = MemoryBuilder(backend, compress_core=False).add_session(bank, SESSION)
    assert off.agents[MemoryKind.CORE].error == "core change over the limit (compression is off)"
    assert bank.core == "a" * 80


def test_build_passes_annotations_speakers_and_streams_records(bank):
    sessions = tuple(make_session([("Ann", f"hello {i}")], session_id=f"session_{i + 1}", prefix=f"D{i + 1}")
                     for i in range(3))
    conv = Conversation("c", ("Ann", "Bob"), sessions, ())
    seen = []
    records = MemoryBuilder(Scripted(VALID)).build(bank, conv, start=1, max_sessions=5, on_record=seen.append)
    assert [r.session_id for r in records] == ["session_2", "session_3"] == [r.session_id for r in seen]
    assert [r.session_index for r in records] == [1, 2]
    assert "Speakers: Ann, Bob." in records[0].agents[MemoryKind.SEMANTIC].messages[1]["content"]


def test_records_serialise_to_json(bank):
    record = MemoryBuilder(Scripted(VALID)).add_session(bank, SESSION)
    assert isinstance(record, SessionRecord) and isinstance(record.agents[MemoryKind.CORE], AgentRecord)
    d = json.loads(json.dumps(record.to_dict()))
    assert d["agents"]["episodic"]["operations"] == [
        {"action": "ADD", "memory": "Caroline adopted a dog named Max.", "time": "2023-05-07"}]
    assert len(d["state_before_sha256"]) == 64 and "state_before" not in d
    assert d["result"]["created"] == ["E1", "S2", "P3"]
    assert json.loads(json.dumps(record.to_dict(with_state=True)))["state_before"]["format"] == "membuilder.bank"


def test_bad_arguments_are_clear_errors(bank):
    with pytest.raises(ValueError, match="generate"):
        MemoryBuilder(object())
    with pytest.raises(ValueError, match="Session"):
        MemoryBuilder(Scripted(VALID)).add_session(bank, {"messages": []})
