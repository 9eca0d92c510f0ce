"""The bundled synthetic world: reproducible, its expert's answers valid and applied with no
rejection, and its QA exact (supported by the expert's memory, latest values, nothing said for
abstentions, relative dates resolved by the stated convention)."""

import json
import re
from datetime import date

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.eval_memory import run
from membuilder.agents import AgentContext, MemoryBuilder, parse_agent_output
from membuilder.bank import MemoryBank
from membuilder.datasets import NOT_ANSWERABLE, load_dataset
from membuilder.embedders import HashingEmbedder
from membuilder.judging import contains_tokens, is_abstention_answer, normalize_tokens
from membuilder.store import InMemoryStore
from membuilder.types import MemoryEntry, MemoryKind, Status
from membuilder.world import (
    MIN_SESSION_QA,
    WorldExpert,
    build_expert_memory,
    generate_conversation,
    generate_world,
    resolve_relative,
)
from membuilder.world import vocab
from reward.types import QA_TYPES, QAPair

RELATIVE = re.compile(
    r"\b(today|this morning|yesterday|(?:two|three|four|five|six|ten) days ago|a week ago|two weeks ago|"
    r"the day after tomorrow|tomorrow|in (?:a week|two weeks|(?:two|three|four|five|six|ten) days)|"
    r"last (?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)|"
    r"this coming (?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday))\b", re.I)


def build(wc, dim=64):
    """Expert memory for one conversation; asserts every step was clean; yields (index, bank, record)."""
    bank = MemoryBank(InMemoryStore(), wc.conversation_id, embedder=HashingEmbedder(dim=dim))
    builder = MemoryBuilder(WorldExpert(wc), snapshots=False, max_workers=1)
    for i, session in enumerate(wc.conversation.sessions):
        record = builder.add_session(bank, session, session_index=i, speakers=wc.conversation.speakers)
        yield i, bank, record


def memory_tokens(bank):
    return [normalize_tokens(bank.core)] + [normalize_tokens(e.text) for e in bank.entries()]


# --- reproducibility ------------------------------------------------------------------------------


def test_same_seed_same_world_and_sizes_nest():
    a = generate_world(3, conversations=2, sessions=5)
    b = generate_world(3, conversations=2, sessions=5)
    assert a == b  # frozen dataclasses all the way down: sessions, turns, plans, QA
    assert a != generate_world(4, conversations=2, sessions=5)
    # conversation k is the same in any world of the seed; the first sessions do not depend on the rest
    longer = generate_conversation(3, 1, 9)
    assert longer.conversation.sessions[:5] == a.conversations[1].conversation.sessions
    assert longer.plans[:5] == a.conversations[1].plans
    assert generate_world(3, conversations=1, sessions=5).conversations[0] == a.conversations[0]


def test_bad_sizes_are_refused():
    for kwargs in ({"conversations": 0}, {"sessions": 0}, {"sessions": 2.5}):
        with pytest.raises(ValueError, match="must be an int"):
            generate_world(0, **kwargs)
    with pytest.raises(ValueError, match="seed"):
        generate_world(-1)


def test_word_lists_keep_core_lines_apart():
    # REPLACE finds a core line by substring: no name may end with another ("Ana" / "Diana")
    names = vocab.FIRST_NAMES
    assert len(set(names)) == len(names)
    assert not [(x, y) for x in names for y in names if x != y and y.endswith(x)]


# --- the expert's answers -------------------------------------------------------------------------


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(min_value=0, max_value=10**9))
def test_expert_outputs_parse_apply_and_support_every_answer(seed):
    wc = generate_world(seed, conversations=1, sessions=10).conversations[0]
    for i, bank, record in build(wc):
        for kind, agent in record.agents.items():
            assert parse_agent_output(kind, agent.raw_output).ok, agent.raw_output
            assert agent.error is None and agent.rejected == (), (kind, agent.error, agent.rejected)
            assert len(agent.operations) == len(agent.parsed)
            if kind is MemoryKind.CORE:  # one operation, never a whole-block REWRITE, never SKIP
                assert len(agent.operations) <= 1
                assert all(op.action in ("APPEND", "REPLACE") for op in agent.operations)
        assert bank.core == wc.plans[i].core_after
        tokens = memory_tokens(bank)
        qa = wc.plans[i].qa
        assert len(qa) >= MIN_SESSION_QA
        for q in qa:
            if q.qtype != "abstention":  # the gold text is in core or in an active entry, by construction
                assert any(contains_tokens(t, normalize_tokens(q.answer)) for t in tokens), q


def test_update_and_merge_name_the_ids_the_bank_assigned():
    wc = generate_world(7, conversations=1, sessions=25).conversations[0]
    actions = {}
    for i, bank, record in build(wc):
        plan = wc.plans[i]
        for kind in (MemoryKind.EPISODIC, MemoryKind.SEMANTIC, MemoryKind.PROCEDURAL):
            agent = record.agents[kind]
            for op in agent.operations:
                actions[op.action] = actions.get(op.action, 0) + 1
            for op, intent in zip(agent.operations, plan.entries_of(kind)):
                if op.action == "UPDATE":  # the updated entry now holds the new text, old text in history
                    assert bank.get(op.id).text == intent.text
                    assert bank.history(op.id)[-1].old_text == intent.replaces[0]
                if op.action == "MERGE":
                    sources = [bank.get(x) for x in op.ids]
                    assert [s.status for s in sources] == [Status.RETIRED] * 2
                    assert sorted(s.text for s in sources) == sorted(intent.replaces)
                    merged = bank.get(sources[0].retired_by)
                    assert merged.text == intent.text and merged.event_time == intent.time
    assert actions.get("UPDATE", 0) >= 5 and actions.get("MERGE", 0) == 1 and actions.get("SKIP", 0) >= 1


def _context(wc, index, kind, *, core="", entries=()):
    return AgentContext(owner=wc.conversation_id, session=wc.conversation.sessions[index], session_index=index,
                        annotation=None, core=core, entries=tuple(entries))


def _entry(entry_id, kind, text):
    return MemoryEntry(id=entry_id, owner="o", kind=kind, text=text, status=Status.ACTIVE, session_id=None,
                       event_time=None, created_at=0.0, updated_at=0.0)


def _first_plan(wc, test):
    return next(p for p in wc.plans if test(p))


def test_expert_updates_shown_entries_and_adds_when_not_shown():
    wc = generate_world(7, conversations=1, sessions=25).conversations[0]
    expert = WorldExpert(wc)
    plan = _first_plan(wc, lambda p: any(e.kind is MemoryKind.SEMANTIC and e.replaces for e in p.entries))
    intent = next(e for e in plan.entries_of(MemoryKind.SEMANTIC) if e.replaces)
    shown = [_entry("S9", MemoryKind.SEMANTIC, "unrelated"), _entry("S41", MemoryKind.SEMANTIC, intent.replaces[0])]
    ops = json.loads(expert.generate(MemoryKind.SEMANTIC, [], context=_context(
        wc, plan.session_index, MemoryKind.SEMANTIC, entries=shown)))["operations"]
    assert {"action": "UPDATE", "id": "S41", "new_memory": intent.text} in ops
    # the same session when the old entry is not among those shown: the expert may not guess an id
    reply = expert.generate_reply(MemoryKind.SEMANTIC, [], context=_context(wc, plan.session_index, MemoryKind.SEMANTIC))
    ops = json.loads(reply.text)["operations"]
    assert {"action": "ADD", "memory": intent.text} in ops and "UPDATE" not in reply.text
    assert any("not shown" in n for n in reply.notes)


def test_expert_core_answers():
    wc = generate_world(7, conversations=1, sessions=25).conversations[0]
    expert = WorldExpert(wc)
    change = _first_plan(wc, lambda p: any(c.old for c in p.core))
    c = next(c for c in change.core if c.old)
    block = f"First line.\n{c.old}\nLast line."
    out = json.loads(expert.generate(MemoryKind.CORE, [], context=_context(wc, change.session_index, MemoryKind.CORE,
                                                                           core=block)))
    assert out == {"action": "REPLACE", "old_text": c.old, "new_text": c.new}
    out = json.loads(expert.generate(MemoryKind.CORE, [], context=_context(wc, change.session_index, MemoryKind.CORE,
                                                                           core="First line.")))
    assert out == {"action": "APPEND", "content": c.new}  # the old line is gone: append the new one
    quiet = _first_plan(wc, lambda p: not p.core)
    raw = expert.generate(MemoryKind.CORE, [], context=_context(wc, quiet.session_index, MemoryKind.CORE, core="x"))
    assert raw == '{"operations": []}'
    parsed = parse_agent_output(MemoryKind.CORE, raw)
    assert parsed.ok and parsed.operations == ()


def test_expert_refuses_sessions_of_other_worlds():
    wc = generate_world(1, conversations=1, sessions=2).conversations[0]
    other = generate_world(2, conversations=1, sessions=2).conversations[0]
    _, records = build_expert_memory(wc)
    assert all(r.errors == {} for r in records)
    bank = MemoryBank(InMemoryStore(), "x")
    record = MemoryBuilder(WorldExpert(wc), snapshots=False).add_session(bank, other.conversation.sessions[0])
    assert set(record.errors) == set(MemoryKind) and "not a session of the worlds" in record.errors[MemoryKind.CORE]


# --- QA -----------------------------------------------------------------------------------------------


def test_session_qa_format_and_mix():
    world = generate_world(11, conversations=3, sessions=12)
    seen = set()
    for wc in world:
        for i, (session, plan) in enumerate(zip(wc.conversation.sessions, wc.plans)):
            items = wc.session_qa(i)
            assert len(items) >= MIN_SESSION_QA
            for d in items:
                pair = QAPair.from_dict(d)  # the reward's own validation
                assert pair.source == "world" and pair.qtype in QA_TYPES
                assert pair.question_date == session.date.date().isoformat()
                seen.add(pair.qtype)
            assert len({d["question_id"] for d in items}) == len(items)
    assert seen == {"single-session", "cross-session", "temporal", "knowledge-update", "abstention"}
    for wc in world:  # one question text, one gold answer
        texts = [q.question for q in wc.qa]
        assert len(set(texts)) == len(texts)
    questions = [q for wc in world for q in wc.conversation.questions]
    assert {q.category for q in questions} == seen
    assert [q.to_question() for wc in world for q in wc.qa] == questions
    assert len({q.question_id for q in questions}) == len(questions)


def test_knowledge_update_gold_is_the_latest_value():
    world = generate_world(5, conversations=3, sessions=20)
    checked = 0
    for wc in world:
        asked = [(q, q.session_index) for p in wc.plans for q in p.qa]
        asked += [(q, len(wc.plans) - 1) for q in wc.qa]
        for q, after in asked:
            if q.qtype != "knowledge-update":
                continue
            # replay the plans up to the session the question follows: the last change of the asked
            # attribute sets the gold (absent before it), and the fact's latest text still holds it
            change = latest = None
            for plan in wc.plans[: after + 1]:
                for intent in (*plan.core, *plan.entries):
                    if intent.fact == q.fact:
                        latest = intent.new if hasattr(intent, "new") else intent.text
                        if intent.attr == q.attr:
                            change = intent
            old = change.old if hasattr(change, "old") else change.replaces[0]
            gold = normalize_tokens(q.answer)
            assert contains_tokens(normalize_tokens(latest), gold), (q, latest)
            assert not contains_tokens(normalize_tokens(old), gold), (q, old)
            checked += 1
    assert checked > 50


def test_abstention_questions_ask_about_nothing_said():
    world = generate_world(2, conversations=4, sessions=15)
    reserved = {w for words, _ in vocab.RESERVED_TOPICS for w in words}
    abstentions = 0
    for wc in world:
        said = {t for s in wc.conversation.sessions for m in s.messages for t in normalize_tokens(m.text)}
        assert not reserved & said
        qs = [q for p in wc.plans for q in p.qa if q.qtype == "abstention"]
        qs += [q for q in wc.qa if q.is_abstention]
        for q in qs:
            assert reserved & set(normalize_tokens(q.question)), q.question
            assert q.answer == NOT_ANSWERABLE and is_abstention_answer(q.answer)
            abstentions += 1
    assert abstentions > 40


# --- dates -------------------------------------------------------------------------------------------


def test_relative_dates_by_hand():
    friday = date(2023, 5, 12)  # a Friday
    expected = {
        "yesterday": date(2023, 5, 11), "this morning": friday, "three days ago": date(2023, 5, 9),
        "two weeks ago": date(2023, 4, 28),  # 12 - 14 = -2 -> 30 April - 2 = 28 April
        "last Tuesday": date(2023, 5, 9),  # Friday -> Tuesday: 3 days back
        "last Friday": date(2023, 5, 5),  # strictly before: a full week back
        "tomorrow": date(2023, 5, 13), "the day after tomorrow": date(2023, 5, 14),
        "in ten days": date(2023, 5, 22), "this coming Monday": date(2023, 5, 15),
        "this coming Friday": date(2023, 5, 19),  # strictly after: a full week ahead
    }
    assert {e: resolve_relative(e, friday) for e in expected} == expected
    with pytest.raises(ValueError, match="unknown relative date"):
        resolve_relative("last fortnight", friday)


def test_dated_entries_come_from_a_relative_expression_of_their_session():
    world = generate_world(9, conversations=3, sessions=15)
    checked = 0
    for wc in world:
        for session, plan in zip(wc.conversation.sessions, wc.plans):
            said = {resolve_relative(m.group(1), session.date.date()).isoformat()
                    for msg in session.messages for m in RELATIVE.finditer(msg.text)}
            for intent in plan.entries_of(MemoryKind.EPISODIC):
                if intent.replaces or intent.fact.startswith("shared"):
                    continue  # postponements ("a week later") and the occasion (said as "July 26")
                assert intent.time in said, (session.session_id, intent)
                assert intent.text.endswith(f"on {_date_text(intent.time)}.")
                checked += 1
    assert checked > 60


def _date_text(iso):
    d = date.fromisoformat(iso)
    return f"{d.day} {d.strftime('%B')} {d.year}"


# --- dataset and benchmark ----------------------------------------------------------------------------


def test_load_dataset_world():
    convs = load_dataset("world", seed=1, conversations=2, sessions=3)
    assert [c.conversation_id for c in convs] == ["world-1-000", "world-1-001"]
    assert all(c.dataset == "world" and len(c.sessions) == 3 and c.questions for c in convs)
    assert convs == generate_world(1, conversations=2, sessions=3).dataset()
    with pytest.raises(ValueError, match="generated, not read"):
        load_dataset("world", "some/file.json")
    with pytest.raises(ValueError, match="only the world dataset takes options"):
        load_dataset("locomo", seed=1)


def test_eval_memory_world_expert_beats_rag(tmp_path):
    base = ["--dataset", "world", "--conversations", "2", "--world-sessions", "6", "--embedder", "hashing",
            "--no-progress"]
    expert = run([*base, "--builder", "world", "--out", str(tmp_path / "w")])
    rag = run([*base, "--builder", "rag", "--out", str(tmp_path / "r")])
    assert expert["build"]["sessions"] == 12
    assert expert["build"]["agent_errors"] == 0 and expert["build"]["rejected_operations"] == 0
    assert expert["overall"]["questions"] == rag["overall"]["questions"] > 20
    assert expert["overall"]["correct"] > rag["overall"]["correct"]
    assert "abstention" in expert["apart"]  # reported apart, like LongMemEval's
    with pytest.raises(SystemExit):
        run([*base, "--builder", "world", "--dataset", "locomo", "--out", str(tmp_path / "x")])


def test_world_check_command():
    from membuilder.world.__main__ import check_world, render

    report = check_world(1, 2, 4, progress=False)
    assert report["sessions"] == 8 and report["agent_errors"] == 0 and report["rejected"] == 0
    expert, empty = report["correct"]["expert"], report["correct"]["empty"]
    # the empty memory abstains on everything: right on every abstention, wrong on everything else
    assert empty["abstention"] == report["session_qa"]["abstention"]
    assert sum(empty.values()) == empty["abstention"]
    assert sum(expert.values()) - expert["abstention"] > 0
    assert "| all |" in render(report)
