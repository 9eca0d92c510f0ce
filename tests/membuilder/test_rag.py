"""RAG over raw turns and the full-context baseline, by hand on a two-session conversation."""

from datetime import datetime

import pytest

from membuilder.answering import ExtractiveAnswerer, answer_with_context
from membuilder.bank import MemoryBank
from membuilder.datasets import Conversation, Message, Question, Session
from membuilder.rag import (
    ContextTooLong,
    chunk_conversation,
    chunk_session,
    full_context,
    index_turns,
    rag_context,
    render_session,
)
from membuilder.store import InMemoryStore


def msg(speaker, text, tid):
    return Message(speaker=speaker, role="user" if speaker == "Ann" else "assistant", text=text, turn_id=tid)


S1 = Session("session_1", datetime(2023, 5, 8, 13, 56), "1:56 pm on 8 May, 2023", (
    msg("Ann", "I adopted a puppy called Rex.", "D1:1"),
    msg("Bob", "Congrats! What breed?", "D1:2"),
    msg("Ann", "A beagle.", "D1:3"),
    msg("Bob", "Nice.", "D1:4"),
    msg("Ann", "Rex loves the park.", "D1:5"),
))
S2 = Session("session_2", datetime(2023, 6, 1, 9, 0), "9:00 am on 1 June, 2023", (
    msg("Bob", "I ran a marathon in Boston last week.", "D2:1"),
    msg("Ann", "Wow, how long did it take?", "D2:2"),
))
Q = Question(question_id="c/q0", question="What breed is Rex?", answer="beagle", category="single-hop",
             evidence=("D1:3",), question_date=None, is_abstention=False)
CONV = Conversation("c", ("Ann", "Bob"), (S1, S2), (Q,), dataset="locomo")


def test_chunk_session_by_turn_count():
    chunks = chunk_session(S1, max_turns=2)
    assert [c.turn_ids for c in chunks] == [("D1:1", "D1:2"), ("D1:3", "D1:4"), ("D1:5",)]
    assert chunks[0].text == ("Session date: 1:56 pm on 8 May, 2023\n"
                              "Ann: I adopted a puppy called Rex.\nBob: Congrats! What breed?")
    assert all(c.session_id == "session_1" and c.date == S1.date for c in chunks)


def test_chunk_session_by_characters_never_cuts_a_turn():
    # line lengths: 34, 26, 14, 10, 24 ("Speaker: text"); budget 40 -> a new chunk whenever the next
    # line would pass 40: [34], [26, 14 = 40], [10, 24 = 34]
    chunks = chunk_session(S1, max_turns=10, max_chars=40)
    assert [c.turn_ids for c in chunks] == [("D1:1",), ("D1:2", "D1:3"), ("D1:4", "D1:5")]
    # one turn longer than the budget is a chunk of its own, whole
    assert [c.turn_ids for c in chunk_session(S1, max_turns=10, max_chars=5)] == [(f"D1:{i}",) for i in range(1, 6)]
    with pytest.raises(ValueError):
        chunk_session(S1, max_turns=0)


def test_chunk_conversation_respects_session_limit():
    assert {c.session_id for c in chunk_conversation(CONV, max_sessions=1)} == {"session_1"}
    assert len(chunk_conversation(CONV, max_turns=4)) == 3  # 4 + 1 turns, then 2


def test_index_turns_stores_dated_episodic_chunks_one_batch_per_session():
    bank = MemoryBank(InMemoryStore(), "c")
    assert index_turns(bank, CONV, max_turns=4) == 3
    entries = bank.entries()
    assert [(e.id, e.kind.value, e.session_id, e.event_time) for e in entries] == [
        ("E1", "episodic", "session_1", "2023-05-08T13:56:00"),
        ("E2", "episodic", "session_1", "2023-05-08T13:56:00"),
        ("E3", "episodic", "session_2", "2023-06-01T09:00:00"),
    ]
    assert [h.session_id for h in bank.history()] == ["session_1"] * 2 + ["session_2"]
    with pytest.raises(ValueError, match="not empty"):
        index_turns(bank, CONV)


def test_rag_context_and_answer_are_labelled_raw():
    bank = MemoryBank(InMemoryStore(), "c")
    index_turns(bank, CONV, max_turns=2)  # E1 (D1:1-2), E2 (D1:3-4), E3 (D1:5), E4 (D2:1-2)
    ctx = rag_context(bank, Q, k=2, current_date=datetime(2023, 6, 1, 9, 0))
    assert len(ctx.hits) == 2 and ctx.hit_label == "raw"
    assert ctx.date_is_inferred and ctx.question_date == "1 June 2023, 09:00"
    # "breed" is in E1 only and "rex" in E1 and E3: E1 ranks first; shown in time order
    assert ctx.hits[0].entry.id == "E1"
    record = answer_with_context(Q, ctx, ExtractiveAnswerer())
    assert record.kinds_of_hits == ("raw", "raw")
    # content words {breed, rex}: "Ann: I adopted a puppy called Rex." has rex, "Bob: Congrats!" no,
    # "What breed?" has breed: tie at 1/2, first sentence of the best-ranked chunk wins
    assert record.answer == "[8 May 2023] Ann: I adopted a puppy called Rex."


def test_full_context_fits():
    ctx = full_context(CONV, Q, current_date=datetime(2023, 6, 1, 9, 0))
    assert [h.entry.id for h in ctx.hits] == ["session_1", "session_2"] and ctx.hit_label == "session"
    user = ctx.prompt[1]["content"]
    assert user.startswith(render_session(S1) + "\n\n" + render_session(S2))
    assert render_session(S2) == ("=== session_2 (9:00 am on 1 June, 2023) ===\n"
                                  "Bob: I ran a marathon in Boston last week.\nAnn: Wow, how long did it take?")
    assert "Current date: 1 June 2023, 09:00 (the question has no date" in user
    assert user.endswith("Question: What breed is Rex?\nAnswer:")


def test_full_context_too_long_is_skipped_or_truncated():
    total = len(render_session(S1)) + 2 + len(render_session(S2)) + 2
    with pytest.raises(ContextTooLong, match=f"{total} characters, over the budget of 100; does not fit"):
        full_context(CONV, Q, max_chars=100)
    only_last = full_context(CONV, Q, max_chars=len(render_session(S2)) + 2, policy="truncate")
    assert [h.entry.id for h in only_last.hits] == ["session_2"]
    assert "(The 1 oldest session(s) did not fit and are left out.)" in only_last.prompt[1]["content"]
    assert full_context(CONV, Q, max_chars=total).hits[0].entry.id == "session_1"  # exactly at the budget
    assert [h.entry.id for h in full_context(CONV, Q, max_sessions=1).hits] == ["session_1"]
