"""The long/short-term builder: application, hostile outputs, consolidation, the offline experts."""

import json
from datetime import datetime

import pytest

from membuilder.agents.backends import AgentGenerationError
from membuilder.answering import build_answer_context
from membuilder.bank import MemoryBank
from membuilder.datasets import Conversation, Message, Question, Session, SessionAnnotation, Observation, Event
from membuilder.longshort import (
    AnnotationLongShortExpert,
    LongShortBuilder,
    OfflineAnswerAgent,
    WorldLongShortExpert,
)
from membuilder.longshort.builder import LONG_TERM_KIND
from membuilder.operations import Add
from membuilder.store import InMemoryStore
from membuilder.types import Status


def session(sid="s1", text="Ann: I adopted a cat named Tom.", day=8):
    return Session(sid, datetime(2023, 5, day), None, (Message("Ann", "user", text, f"{sid}:0"),))


class Scripted:
    """Answers each role from a queue of texts (or raises an exception put in the queue)."""

    name = "scripted"

    def __init__(self, **queues):
        self.queues = {k: list(v) for k, v in queues.items()}
        self.contexts = []

    def generate(self, role, messages, *, context):
        self.contexts.append((role, context))
        item = self.queues[role].pop(0)
        if isinstance(item, Exception):
            raise item
        return item


def bank_with(*texts):
    bank = MemoryBank(InMemoryStore(), "u")
    if texts:
        bank.apply([Add(LONG_TERM_KIND, t) for t in texts])
    return bank


def dumps(**kw):
    return json.dumps(kw)


def test_add_update_delete_noop_in_one_session():
    bank = bank_with("Ann has a dog named Rex.", "Ann lives in Paris.", "Ann likes jazz.")  # S1, S2, S3
    backend = Scripted(
        splitter=[dumps(important=["Ann adopted a cat named Tom.", "Ann moved to Lyon.", "Ann no longer has a dog.",
                                   "Ann likes jazz."], unimportant=["Ann said hello."])],
        long_term=[dumps(decisions=[
            {"fact": 0, "action": "ADD", "memory": "Ann adopted a cat named Tom."},
            {"fact": 1, "action": "UPDATE", "id": "S2", "memory": "Ann lives in Lyon."},
            {"fact": 2, "action": "DELETE", "id": "S1"},
            {"fact": 3, "action": "NOOP"}])],
        short_term=[dumps(state="Ann said hello.")])
    rec = LongShortBuilder(backend, top_k=3).add_session(bank, session())
    assert all(r.valid for r in rec.agents.values())
    active = {e.id: e.text for e in bank.entries()}
    # S1 retired (no successor), S2 rewritten, S3 untouched, S4 the new one, dated with the session
    assert active == {"S2": "Ann lives in Lyon.", "S3": "Ann likes jazz.", "S4": "Ann adopted a cat named Tom."}
    assert bank.get("S1").status is Status.RETIRED and bank.get("S1").retired_by is None
    assert bank.get("S4").event_time == "2023-05-08"
    assert bank.core == "Ann said hello."
    assert rec.result.created == ("S4",) and rec.result.updated == ("S2",) and rec.result.retired == ("S1",)
    assert rec.noop_facts == 1
    assert [o["action"] for o in rec.agents["long_term"].operations] == ["ADD", "UPDATE", "DELETE"]
    # one transaction: the history has one session id on every record of this batch
    assert [h.event for h in bank.history() if h.session_id == "s1"] == ["ADD", "UPDATE", "DELETE", "CORE_REWRITE"]
    # the long-term agent was shown, for each fact, the candidates it may name
    role, ctx = backend.contexts[1]
    assert role == "long_term" and len(ctx.candidates) == 4


def test_hostile_long_term_output_is_an_error_and_loses_nothing():
    bank = bank_with("Ann has a dog named Rex.")
    before = bank.snapshot()
    backend = Scripted(splitter=[dumps(important=["Ann moved."], unimportant=[])],
                       long_term=['{"decisions": [{"fact": 0, "action": "DELETE", "id": "S77"}]}'])
    rec = LongShortBuilder(backend).add_session(bank, session())
    lt = rec.agents["long_term"]
    assert not lt.valid and "was not shown with fact 0" in lt.error
    assert lt.raw_output.startswith('{"decisions"')
    assert rec.agents["short_term"].skipped == "no unimportant facts"
    assert bank.snapshot() == before


def test_backend_exception_is_recorded_per_agent():
    bank = bank_with()
    backend = Scripted(splitter=[AgentGenerationError("cut off", raw_output='{"important": [')])
    rec = LongShortBuilder(backend).add_session(bank, session())
    sp = rec.agents["splitter"]
    assert sp.error == "cut off" and sp.raw_output == '{"important": ['
    assert rec.agents["long_term"].skipped == rec.agents["short_term"].skipped == "the splitter gave no usable answer"
    assert len(bank) == 0 and bank.core == ""


def test_over_long_state_goes_to_consolidation_never_cut():
    bank = bank_with()
    backend = Scripted(splitter=[dumps(important=[], unimportant=["a b c"])],
                       short_term=[dumps(state="x" * 11), dumps(state="short")])
    rec = LongShortBuilder(backend, state_limit=10).add_session(bank, session())
    st = rec.agents["short_term"]
    assert st.valid and st.consolidation["proposed_chars"] == 11 and st.consolidation["error"] is None
    assert backend.contexts[-1][1].purpose == "compress" and backend.contexts[-1][1].state == "x" * 11
    assert bank.core == "short"


def test_failed_consolidation_keeps_the_old_state():
    bank = bank_with()
    bank.apply([__import__("membuilder.operations", fromlist=["CoreRewrite"]).CoreRewrite("old")])
    backend = Scripted(splitter=[dumps(important=[], unimportant=["new"])],
                       short_term=[dumps(state="y" * 11), dumps(state="z" * 12)])
    rec = LongShortBuilder(backend, state_limit=10).add_session(bank, session())
    st = rec.agents["short_term"]
    assert not st.valid and "consolidation failed" in st.error and "12 characters" in st.error
    assert bank.core == "old"


def test_state_limit_over_core_limit_is_refused():
    bank = MemoryBank(InMemoryStore(), "u", core_limit=50)
    with pytest.raises(ValueError, match="over the bank's core limit"):
        LongShortBuilder(Scripted(), state_limit=51).add_session(bank, session())


def test_world_expert_builds_the_plans_facts():
    from membuilder.world import generate_world

    world = generate_world(2, conversations=1, sessions=8)  # one restated fact in session 0..7
    wc = world.conversations[0]
    bank = MemoryBank(InMemoryStore(), wc.conversation_id)
    expert = WorldLongShortExpert(world)
    records = LongShortBuilder(expert).build(bank, wc.conversation)
    assert all(r.valid for rec in records for r in rec.agents.values())
    plan0 = wc.plans[0]
    first = {h.new_text for h in bank.history() if h.session_id == plan0.session_id and h.event == "ADD"}
    # session 0: every core line and every non-restated entry intent is one long-term memory
    assert first == {c.new for c in plan0.core} | {e.text for e in plan0.entries if not e.restate}
    # a restated fact is stored once (when first stated); its restatement goes to the state only
    restated = {e.text for p in wc.plans for e in p.entries if e.restate}
    assert all(sum(h.new_text == t for h in bank.history() if h.entry_id != "core") == 1 for t in restated)
    assert len(restated) == 1 and set(bank.core.split("\n")) == restated


def test_annotation_expert_and_offline_answer_agent():
    ann = SessionAnnotation("s1", datetime(2023, 5, 7), "7 May, 2023",
                            (Observation("Ann", "Ann adopted a cat named Tom.", ("s1:0",)),),
                            (Event("Ann", "Ann adopts a cat."),), summary="Ann told Ben about Tom. Ben was glad.")
    conv = Conversation("c", ("Ann", "Ben"), (session(),), (), annotations=(ann,))
    bank = MemoryBank(InMemoryStore(), "c")
    LongShortBuilder(AnnotationLongShortExpert()).build(bank, conv)
    assert sorted(e.text for e in bank.entries()) == ["Ann adopted a cat named Tom.", "On 2023-05-07: Ann adopts a cat."]
    assert bank.core == "Ann told Ben about Tom\nBen was glad."
    # a second run of the same session: the facts are already stored, so every decision is NOOP
    rec = LongShortBuilder(AnnotationLongShortExpert()).add_session(bank, session(), annotation=ann)
    assert rec.noop_facts == 2 and len(bank) == 2
    q = Question("q", "Who was glad?", "Ben", "1", (), None, False)
    answer = OfflineAnswerAgent().answer(q, build_answer_context(bank, q))
    assert answer == "Ben was glad."  # only the state holds it
