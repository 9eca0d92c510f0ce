"""The annotation expert: valid agent outputs from LoCoMo annotations, with no LLM."""

import json
from datetime import datetime

import pytest

from membuilder.agents import AgentContext, AnnotationExpert, MemoryBuilder, parse_agent_output
from membuilder.bank import MemoryBank
from membuilder.datasets import (
    Event,
    Observation,
    SessionAnnotation,
    default_data_dir,
    load_locomo,
    load_longmemeval,
)
from membuilder.embedders import HashingEmbedder
from membuilder.operations import Add
from membuilder.store import InMemoryStore
from membuilder.types import MemoryKind

from .conftest import make_session

DATA = default_data_dir()  # $MEMBUILDER_DATA_DIR, else ../shared/data
LOCOMO = DATA / "locomo" / "locomo10.json"
ORACLE = DATA / "longmemeval" / "longmemeval_oracle_dev.json.gz"


@pytest.fixture(scope="module")
def conv26():
    if not LOCOMO.is_file():
        pytest.skip(f"LoCoMo data not found at {LOCOMO} (shared/data is absent on this machine)")
    return load_locomo(LOCOMO)[0]


@pytest.fixture(scope="module")
def built(conv26):
    store = InMemoryStore()
    bank = MemoryBank(store, conv26.conversation_id, embedder=HashingEmbedder(dim=128))
    records = MemoryBuilder(AnnotationExpert()).build(bank, conv26)
    yield bank, records
    store.close()


def test_expert_memory_for_a_locomo_conversation_is_all_valid(conv26, built):
    bank, records = built
    assert len(records) == len(conv26.sessions) == 19
    for record in records:
        assert record.errors == {}, record.session_id
        for kind, agent in record.agents.items():
            assert agent.rejected == () and agent.error is None
            assert parse_agent_output(kind, agent.raw_output).ok  # the gate accepts every expert output
    # every distinct fact becomes one semantic entry, every event one episodic entry (no repeats in conv-26)
    n_facts = sum(len(a.observations) for a in conv26.annotations)
    n_events = sum(len(a.events) for a in conv26.annotations)
    assert (n_facts, n_events) == (184, 25)
    assert len(bank.entries("semantic")) == n_facts and len(bank.entries("episodic")) == n_events
    assert 0 < len(bank.core) <= 4500  # filled at most to 90% of the 5,000 limit


def test_entries_carry_the_right_kinds_and_dates(conv26, built):
    bank, _ = built
    session_date = {s.session_id: s.date.date().isoformat() for s in conv26.sessions}
    event_date = {a.session_id: a.date.date().isoformat() for a in conv26.annotations}
    for e in bank.entries("episodic"):
        assert e.event_time == event_date[e.session_id]
    for e in bank.entries("semantic"):
        assert e.event_time == session_date[e.session_id]
    for e in bank.entries("procedural"):
        assert e.event_time is None


def test_hand_checked_entries(built):
    bank, _ = built
    by_text = {e.text: e for e in bank.entries()}
    # conv-26 event_summary, session 1 (8 May, 2023)
    e = by_text["Caroline attends an LGBTQ support group for the first time."]
    assert (e.kind, e.event_time, e.session_id) == (MemoryKind.EPISODIC, "2023-05-08", "session_1")
    # observation D3:16, session 3 (9 June, 2023): a semantic fact, and an identity fact ("married") for core
    s = by_text["Melanie has been married for 5 years."]
    assert (s.kind, s.event_time, s.session_id) == (MemoryKind.SEMANTIC, "2023-06-09", "session_3")
    assert "Melanie has been married for 5 years." in bank.core.split("\n")
    # observation D2:5: "each day" makes it a routine
    p = by_text["Melanie carves out me-time each day for activities like running, reading, or playing the violin."]
    assert p.kind is MemoryKind.PROCEDURAL


def _context(kind_entries=(), core="", annotation=None, session=None, purpose="update", core_limit=5000):
    session = session or make_session([("Ann", "hi")])
    return AgentContext(owner="o", session=session, session_index=0, annotation=annotation, core=core,
                        entries=tuple(kind_entries), speakers=("Ann", "Bob"), core_limit=core_limit,
                        purpose=purpose)


ANN = SessionAnnotation(
    session_id="session_1", date=datetime(2023, 5, 7), date_text="7 May, 2023",
    observations=(Observation("Ann", "Ann lives in Oslo.", ("D1:1",)),
                  Observation("Ann", "Ann loves skiing.", ("D1:2",)),
                  Observation("Ann", "ann LIVES in Oslo!", ("D1:3",)),  # the same text, normalised
                  Observation("Bob", "Bob works as a nurse.", ("D1:4",)),
                  Observation("Bob", "Bob runs every morning before work.", ("D1:5",))),
    events=(Event("Ann", "Ann moved to Oslo."),))


def test_existing_entries_give_skip_and_repeats_are_added_once(bank):
    bank.apply([Add("semantic", "Ann lives in Oslo.")])  # S1
    expert = AnnotationExpert()
    reply = expert.generate_reply(MemoryKind.SEMANTIC, [], context=_context(bank.entries("semantic"), annotation=ANN))
    ops = json.loads(reply.text)["operations"]
    assert ops == [{"action": "SKIP", "reason": "already stored as S1"},
                   {"action": "ADD", "memory": "Ann loves skiing.", "time": "2023-05-08"},
                   {"action": "SKIP", "reason": "already stored as S1"},
                   {"action": "ADD", "memory": "Bob works as a nurse.", "time": "2023-05-08"},
                   {"action": "ADD", "memory": "Bob runs every morning before work.", "time": "2023-05-08"}]


def test_core_gets_identity_first_and_never_passes_its_fill_limit():
    expert = AnnotationExpert()
    reply = expert.generate_reply(MemoryKind.CORE, [], context=_context(annotation=ANN))
    # identity facts (lives in, works as) before the preference (loves); the repeat left out
    assert json.loads(reply.text) == {"action": "APPEND",
                                      "content": "Ann lives in Oslo.\nBob works as a nurse.\nAnn loves skiing."}
    # a nearly full core: the fill limit is 90 (90% of 100) and 80 + 1 (newline) + 18 = 99 > 90,
    # so not even the shortest fact (18 characters) fits
    full = expert.generate_reply(MemoryKind.CORE, [], context=_context(core="x" * 80, annotation=ANN, core_limit=100))
    assert json.loads(full.text) == {"operations": []}
    assert "not copied to core" in full.notes[0]
    # facts already in the block are not repeated
    again = expert.generate_reply(MemoryKind.CORE, [], context=_context(core="Ann lives in Oslo.", annotation=ANN))
    assert json.loads(again.text)["content"] == "Bob works as a nurse.\nAnn loves skiing."


def test_core_block_stays_under_the_limit_over_many_sessions(clock):
    store = InMemoryStore()
    bank = MemoryBank(store, "o", clock=clock, core_limit=300)
    expert = AnnotationExpert()
    for i in range(30):
        fact = f"Ann{i} lives in town number {i} with her family."
        ann = SessionAnnotation(f"session_{i}", None, None, (Observation("Ann", fact, ()),), ())
        record = MemoryBuilder(expert).add_session(bank, make_session([("Ann", "hi")], session_id=f"session_{i}"),
                                                   annotation=ann)
        assert record.errors == {} and record.agents[MemoryKind.CORE].rejected == ()
        assert len(bank.core) <= 270
    assert len(bank.core) > 200  # it did fill up


def test_episodic_and_procedural_outputs(bank):
    bank.apply([Add("episodic", "Ann moved to Oslo.", "2023-05-07")])
    expert = AnnotationExpert()
    epi = expert.generate_reply(MemoryKind.EPISODIC, [], context=_context(bank.entries("episodic"), annotation=ANN))
    assert json.loads(epi.text) == {"operations": []} and "already stored" in epi.notes[0]
    fresh = expert.generate_reply(MemoryKind.EPISODIC, [], context=_context(annotation=ANN))
    assert json.loads(fresh.text) == {"operations": [{"action": "ADD", "memory": "Ann moved to Oslo.",
                                                      "time": "2023-05-07"}]}
    proc = expert.generate_reply(MemoryKind.PROCEDURAL, [], context=_context(annotation=ANN))
    assert json.loads(proc.text) == {"operations": [{"action": "ADD", "memory": "Bob runs every morning before work."}]}


def test_no_annotation_and_compression_give_empty_valid_answers():
    expert = AnnotationExpert()
    for kind in MemoryKind:
        reply = expert.generate_reply(kind, [], context=_context())
        assert reply.text == '{"operations": []}' and parse_agent_output(kind, reply.text).ok
        assert reply.notes == ("no annotation for session_1: the annotation expert has nothing to add",)
    comp = expert.generate_reply(MemoryKind.CORE, [], context=_context(annotation=ANN, purpose="compress"))
    assert comp.text == '{"operations": []}'
    with pytest.raises(ValueError, match="annotation of session_1 given for session session_9"):
        expert.generate_reply(MemoryKind.CORE, [], context=_context(
            annotation=ANN, session=make_session([("Ann", "hi")], session_id="session_9")))


def test_longmemeval_sessions_get_empty_outputs_that_say_why(clock):
    if not ORACLE.is_file():
        pytest.skip(f"LongMemEval oracle data not found at {ORACLE}")
    conv = load_longmemeval(ORACLE)[0]
    store = InMemoryStore()
    bank = MemoryBank(store, conv.conversation_id, clock=clock)
    records = MemoryBuilder(AnnotationExpert()).build(bank, conv, max_sessions=2)
    assert len(bank.entries()) == 0 and bank.core == ""
    for record in records:
        assert record.errors == {}
        for agent in record.agents.values():
            assert agent.notes and "no annotation" in agent.notes[0]
