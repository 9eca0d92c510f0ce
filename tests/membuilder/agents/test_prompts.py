"""Prompt rendering: own-kind entries with ids, a bounded search query, a hard size limit."""

import re
from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from membuilder.agents import (
    AGENT_KINDS,
    PromptBudgetError,
    chars_for_tokens,
    render_compression_prompt,
    render_prompt,
    render_session_prompts,
    select_entries,
    session_query,
)
from membuilder.bank import MemoryBank
from membuilder.datasets import Message, Session
from membuilder.operations import Add, CoreAppend
from membuilder.store import InMemoryStore
from membuilder.types import MemoryKind

from .conftest import make_session

ENTRY_ID = re.compile(r"\[([ESP]\d+)\]")

SESSION = make_session([
    ("Caroline", "I went to a LGBTQ support group yesterday and it was so powerful."),
    ("Melanie", "Wow! I ran a charity race for mental health last Saturday."),
    ("Caroline", "I'm researching adoption agencies; I want to give kids a loving home."),
])


def _fill(bank, n_each):
    ops = []
    for i in range(n_each):
        ops += [Add("episodic", f"Caroline went to a support group meeting number {i}", "2023-05-01"),
                Add("semantic", f"Melanie likes running race number {i}"),
                Add("procedural", f"Melanie's routine number {i}: stretch, then run")]
    bank.apply(ops)


def test_each_agent_sees_ids_of_its_own_kind_only(bank):
    _fill(bank, 3)
    bank.apply([CoreAppend("Caroline is a counsellor.")])
    prompts = render_session_prompts(bank, SESSION)
    assert set(prompts) == set(AGENT_KINDS)
    prefix = {MemoryKind.EPISODIC: "E", MemoryKind.SEMANTIC: "S", MemoryKind.PROCEDURAL: "P"}
    for kind, p in prompts.items():
        shown = set(ENTRY_ID.findall(p.messages[1]["content"]))
        if kind is MemoryKind.CORE:
            assert shown == set() and p.entries == ()
            assert "Caroline is a counsellor." in p.messages[1]["content"]
            continue
        own = {e.id for e in bank.entries(kind)}
        assert shown == own == {e.id for e in p.entries}  # 3 entries <= top_k: all of them
        assert all(i.startswith(prefix[kind]) for i in shown)
        assert "out of 3" in p.messages[1]["content"]


def test_top_k_limits_the_entries_shown_and_fills_when_bm25_finds_few(clock):
    store = InMemoryStore()
    bank = MemoryBank(store, "o", clock=clock)  # BM25 only: entries sharing no word are not hits
    bank.apply([Add("semantic", f"fact number {i} about zebras") for i in range(30)]
               + [Add("semantic", "Melanie ran a charity race")])
    query = session_query(SESSION)
    entries, total = select_entries(bank, "semantic", query, top_k=5)
    assert total == 31 and len(entries) == 5
    assert entries[0].text == "Melanie ran a charity race"  # the one BM25 hit ranks first
    few, _ = select_entries(bank, "semantic", "nothing matches here", top_k=40)
    assert len(few) == 31  # fewer than k of the kind: all shown
    assert select_entries(bank, "episodic", query, top_k=5) == ([], 0)


class _SpyBank(MemoryBank):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.queries = []

    def search(self, query, **kw):
        self.queries.append((query, kw.get("kinds")))
        return super().search(query, **kw)


def test_search_query_is_bounded_and_kind_filtered(clock):
    store = InMemoryStore()
    bank = _SpyBank(store, "o", clock=clock)
    _fill(bank, 2)
    long_session = make_session([("Caroline" if i % 2 else "Melanie", f"turn {i} " + "word " * 300)
                                 for i in range(200)])
    render_session_prompts(bank, long_session)
    assert len(bank.queries) == 3
    assert {str(MemoryKind.parse(k).value) for _, k in bank.queries} == {"episodic", "semantic", "procedural"}
    for query, _ in bank.queries:
        assert len(query) <= 2000
    # the query samples the whole session, not only its start: a late turn contributes
    assert "turn 199" in bank.queries[0][0] or "turn 198" in bank.queries[0][0]


def test_session_query_short_sessions_are_given_whole():
    assert session_query(SESSION) == "\n".join(m.text for m in SESSION.messages)


def test_core_prompt_states_limit_and_current_length():
    core = "Caroline is a counsellor.\nMelanie is married."
    p = render_prompt("core", SESSION, core=core)
    assert f"({len(core)} of 5000 characters)" in p.messages[1]["content"]
    # 25 + 1 (newline) + 19 characters
    assert "hard limit of 5000 characters and now has 45" in p.messages[0]["content"]
    assert '"enum":["APPEND"]' in p.messages[0]["content"]  # the exact schema is in the prompt


def test_prompt_has_date_speakers_and_turns():
    p = render_prompt("semantic", SESSION)
    user = p.messages[1]["content"]
    assert "Session date: 2023-05-08 (Monday) 13:56" in user
    assert "Speakers: Caroline, Melanie." in user
    assert "[D1:2] Melanie: Wow! I ran a charity race for mental health last Saturday." in user
    assert "Existing semantic memory: empty" in user


def _long_session(n_turns=400):
    return make_session([("Caroline" if i % 2 else "Melanie", f"Turn {i}: " + "some words here " * (3 + i % 7))
                         for i in range(n_turns)])


def test_very_long_session_stays_under_the_limit_with_whole_turns(bank):
    _fill(bank, 25)
    session = _long_session()
    prompts = render_session_prompts(bank, session, max_prompt_chars=9000)
    for kind, p in prompts.items():
        assert p.chars <= 9000, kind
        user = p.messages[1]["content"]
        kept = [m for m in session.messages if m.turn_id not in p.omitted_turns]
        assert kept and p.omitted_turns
        for m in kept:  # every shown turn is whole
            assert f"[{m.turn_id}] {m.speaker}: {m.text}\n" in user
        # omitted turns are the tail, and the marker names them
        ids = [m.turn_id for m in session.messages]
        assert list(p.omitted_turns) == ids[len(kept):]
        assert f"{len(p.omitted_turns)} later turns ({p.omitted_turns[0]} to {ids[-1]}) are left out" in user
        assert p.shortened_turns == ()


def test_one_huge_turn_is_shortened_with_a_marker():
    session = make_session([("user", "short question"), ("assistant", "x " * 20000), ("user", "thanks")])
    p = render_prompt("episodic", session, max_prompt_chars=8000, max_turn_chars=1500)
    user = p.messages[1]["content"]
    assert p.chars <= 8000
    assert p.shortened_turns == ("D1:2",) and p.omitted_turns == ()
    assert "more characters of this turn left out]" in user
    assert "[D1:3] user: thanks" in user
    assert "The memory is about the user" in user


def test_too_small_budget_is_a_clear_error():
    with pytest.raises(PromptBudgetError, match="max_prompt_chars=1000 is too small"):
        render_prompt("semantic", SESSION, max_prompt_chars=1000)


def test_entries_of_the_wrong_kind_are_refused(bank):
    _fill(bank, 1)
    with pytest.raises(ValueError, match="only semantic entries"):
        render_prompt("semantic", SESSION, entries=bank.entries("episodic"))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["Ann", "Bob"]), st.text(alphabet="abc de\n{}\"", min_size=1, max_size=900)),
                min_size=1, max_size=40),
       st.integers(min_value=5500, max_value=20000), st.integers(min_value=200, max_value=3000))
def test_any_session_fits_any_reasonable_budget(turns, budget, max_turn):
    session = make_session(turns)
    for kind in AGENT_KINDS:
        p = render_prompt(kind, session, core="c" * (300 if kind is MemoryKind.CORE else 0),
                          max_prompt_chars=budget, max_turn_chars=max_turn)
        assert p.chars <= budget
        shown = [m for m in session.messages if m.turn_id not in p.omitted_turns]
        for m in shown:
            if m.turn_id not in p.shortened_turns:
                assert f"[{m.turn_id}] {m.speaker}: {m.text}" in p.messages[1]["content"]


def test_compression_prompt_is_bounded_and_states_the_target():
    msgs = render_compression_prompt("fact. " * 1500, core_limit=5000, max_prompt_chars=6000)
    assert sum(len(m["content"]) for m in msgs) <= 6000
    assert "9000 characters long" in msgs[0]["content"] and "at most 4000 characters" in msgs[0]["content"]
    assert "left out for lack of room" in msgs[1]["content"]


def test_chars_for_tokens():
    # (8192 - 1024 - 64) tokens * 3 characters
    assert chars_for_tokens(8192, 1024) == 21312
    with pytest.raises(ValueError):
        chars_for_tokens(1000, 1000)


def test_unknown_session_date_is_said():
    s = Session("s", None, None, (Message("a", "user", "hi", "t1"),))
    assert "Session date: unknown" in render_prompt("episodic", s).messages[1]["content"]
    dated = make_session([("a", "hi")], date=datetime(2023, 1, 2))
    assert "Session date: 2023-01-02 (Monday) [given as" in render_prompt("episodic", dated).messages[1]["content"]
