"""The answer step by hand on a small bank: retrieval, event-time order, core block, dates,
"Not answerable", the extractive answerer, and the LLM answerer on a local server."""

from datetime import datetime

import pytest

from membuilder.answering import (
    AnswerContext,
    ExtractiveAnswerer,
    LLMAnswerer,
    answer_question,
    answer_with_context,
    build_answer_context,
    format_date,
    order_by_event_time,
)
from membuilder.bank import MemoryBank, SearchResult
from membuilder.datasets import NOT_ANSWERABLE, Question
from membuilder.llm import LLMError
from membuilder.operations import Add, CoreAppend
from membuilder.store import InMemoryStore
from membuilder.types import MemoryEntry, MemoryKind, Status
from tests.membuilder.test_judging import ChatServer

EP, SEM, PROC = MemoryKind.EPISODIC, MemoryKind.SEMANTIC, MemoryKind.PROCEDURAL


@pytest.fixture
def bank():
    b = MemoryBank(InMemoryStore(), "u1")  # no embedder: BM25 ranking only, exact by hand
    b.apply([
        Add(EP, "Caroline adopted a dog named Max", "2023-05-08"),  # E1
        Add(EP, "Caroline walked Max in the park", "2023-03-01"),  # E2
        Add(SEM, "Max is a golden retriever"),  # S3
        Add(SEM, "Melanie paints sunsets"),  # S4
        Add(PROC, "To bake bread: mix flour, water and yeast"),  # P5
        CoreAppend("Caroline: counselor, lives in Boston"),
    ])
    return b


def question(text="What kind of dog is Max?", date=None, qid="q1", answer="golden retriever"):
    return Question(question_id=qid, question=text, answer=answer, category="single-hop", evidence=(),
                    question_date=date, is_abstention=False)


def entry(eid, text, time=None, kind=EP):
    return MemoryEntry(id=eid, owner="u", kind=kind, text=text, status=Status.ACTIVE, session_id=None,
                       event_time=time, created_at=0.0, updated_at=0.0)


def test_order_by_event_time_unknown_last_and_stable():
    hits = [SearchResult(entry(f"E{i}", "x", t), 1.0, None, None)
            for i, t in enumerate([None, "2023-05-08", None, "2023-01-02T10:00:00", "2023-05-08T00:00:00"])]
    # Jan 2 first; the two 8 May entries (same instant) keep their order; unknowns last, in order
    assert [h.entry.id for h in order_by_event_time(hits)] == ["E3", "E1", "E4", "E0", "E2"]


def test_format_date():
    assert format_date(datetime(2023, 5, 8, 13, 56)) == "8 May 2023, 13:56"
    assert format_date(datetime(2023, 5, 8, 13, 56), with_time=False) == "8 May 2023"
    assert format_date("2023-05-08") == "8 May 2023"
    assert format_date("2023-05-08T00:00:00") == "8 May 2023"
    assert format_date(None) is None


def test_context_orders_by_time_and_puts_core_first(bank):
    # query tokens what/kind/of/dog/is/max: E1 (dog, max), E2 (max), S3 (is, max) match; nothing else does
    ctx = build_answer_context(bank, question(date=datetime(2023, 5, 30, 23, 40)))
    assert [h.entry.id for h in ctx.hits] == ["E2", "E1", "S3"]  # 1 March, 8 May, unknown
    assert ctx.core == "Caroline: counselor, lives in Boston"
    assert ctx.question_date == "30 May 2023, 23:40" and not ctx.date_is_inferred
    system, user = ctx.prompt
    assert system["role"] == "system" and f"answer exactly: {NOT_ANSWERABLE}" in system["content"]
    assert user["content"] == (
        "Core memory:\nCaroline: counselor, lives in Boston\n\n"
        "Retrieved memories (oldest first):\n"
        "- [E2 | episodic | 1 March 2023] Caroline walked Max in the park\n"
        "- [E1 | episodic | 8 May 2023] Caroline adopted a dog named Max\n"
        "- [S3 | semantic | date unknown] Max is a golden retriever\n\n"
        "Current date: 30 May 2023, 23:40\n\n"
        "Question: What kind of dog is Max?\nAnswer:")
    assert ctx.text.splitlines()[0] == ctx.core and "golden retriever" in ctx.text


def test_context_top_k_limits_before_ordering(bank):
    ctx = build_answer_context(bank, question(), k=2)
    # E2 matches one term only; the two best (E1, S3) are then shown by time: E1 dated, S3 unknown
    assert [h.entry.id for h in ctx.hits] == ["E1", "S3"]


def test_inferred_date_is_said_and_no_date_is_left_out(bank):
    ctx = build_answer_context(bank, question(), current_date=datetime(2023, 10, 22, 9, 55))
    assert ctx.question_date == "22 October 2023, 09:55" and ctx.date_is_inferred
    assert ("Current date: 22 October 2023, 09:55 (the question has no date of its own: this is the "
            "date of the last conversation session)") in ctx.prompt[1]["content"]
    # a question's own date wins over the fallback
    own = build_answer_context(bank, question(date=datetime(2023, 1, 1)), current_date=datetime(2024, 1, 1))
    assert own.question_date == "1 January 2023" and not own.date_is_inferred
    bare = build_answer_context(bank, question())
    assert bare.question_date is None and "Current date" not in bare.prompt[1]["content"]


def test_empty_bank_renders_empty_memory_and_extractive_abstains():
    empty = MemoryBank(InMemoryStore(), "nobody")
    record = answer_question(empty, question(), ExtractiveAnswerer())
    assert record.answer == NOT_ANSWERABLE and record.context_ids == () and record.error is None
    ctx = build_answer_context(empty, question())
    assert "Core memory:\n(empty)" in ctx.prompt[1]["content"] and "(none)" in ctx.prompt[1]["content"]


def test_extractive_answers_best_sentence_with_date(bank):
    # content words {dog, max}: E1 has both (1.0), E2 and S3 one each (0.5)
    record = answer_question(bank, question(), ExtractiveAnswerer())
    assert record.answer == "[8 May 2023] Caroline adopted a dog named Max"
    assert record.context_ids == ("E2", "E1", "S3")
    assert record.kinds_of_hits == ("episodic", "episodic", "semantic")


def test_extractive_picks_a_sentence_and_respects_threshold():
    hits = [SearchResult(entry("S1", "Melanie paints sunsets. She loves the beach at dawn.", kind=SEM), 1.0, 1, None)]
    ctx = AnswerContext(core="", hits=hits, question_date=None, prompt=[])
    q = question("Which beach does Melanie love at dawn?")
    # content words {beach, melanie, love, dawn}: sentence 1 shares {melanie} = 1/4, sentence 2
    # {beach, dawn} = 2/4 ("loves" is not "love")
    assert ExtractiveAnswerer().answer(q, ctx) == "She loves the beach at dawn."
    assert ExtractiveAnswerer(min_overlap=0.75).answer(q, ctx) == NOT_ANSWERABLE
    assert ExtractiveAnswerer().answer(question("What is the capital of France?"), ctx) == NOT_ANSWERABLE
    with pytest.raises(ValueError):
        ExtractiveAnswerer(min_overlap=0)


def test_extractive_ties_go_to_the_better_retrieval_rank():
    # shown oldest first, but S2 was retrieved with the higher score: it wins the 1/2 vs 1/2 tie
    hits = [SearchResult(entry("E1", "Max sleeps a lot", "2023-01-01"), 0.01, 2, None),
            SearchResult(entry("S2", "Max barks at cats", None, SEM), 0.03, 1, None)]
    ctx = AnswerContext(core="", hits=hits, question_date=None, prompt=[])
    assert ExtractiveAnswerer().answer(question("What does Max chase?"), ctx) == "Max barks at cats"


class FailingAnswerer:
    name = "failing"

    def answer(self, question, context):
        raise LLMError("server down")


def test_answer_errors_are_recorded_not_answered(bank):
    record = answer_question(bank, question(), FailingAnswerer())
    assert record.answer is None and record.error == "answer call failed: server down"
    assert record.context_ids == ("E2", "E1", "S3")


def test_llm_answerer_on_local_server(bank):
    server = ChatServer()
    try:
        server.script.extend(["<think>the retriever entry</think>  A golden retriever. ", "   "])
        answerer = LLMAnswerer(server.client(), model="answer-model")
        ctx = build_answer_context(bank, question(), current_date=datetime(2023, 10, 22))
        record = answer_with_context(question(), ctx, answerer)
        assert record.answer == "A golden retriever." and record.error is None
        sent = server.requests[0]
        assert sent["model"] == "answer-model" and sent["messages"] == ctx.prompt
        empty = answer_with_context(question(), ctx, answerer)  # a blank reply is an error, not an answer
        assert empty.answer is None and "empty answer" in empty.error
    finally:
        server.close()


# --- unusable replies are errors (issue 11, items 11 and 12) ------------------------------------------


def test_llm_answerer_unusable_replies_are_errors_not_answers(bank, tmp_path):
    server = ChatServer()
    try:
        server.script.extend([
            ("A golden retr", "length"),  # cut by max_tokens: maybe a partial answer
            "<think>is it the retriever? the entry S3 says",  # stopped while thinking
            "It is probably a retriever, S3 says so</think>",  # all thinking (template opened it)
            "A golden retriever \ud83d",  # invalid Unicode: no record or judge could take it
            "thinking about S3 </think> A golden retriever.",  # the same, with an answer after it
        ])
        answerer = LLMAnswerer(server.client(), model="answer-model")
        ctx = build_answer_context(bank, question(), current_date=datetime(2023, 10, 22))
        errors = [answer_with_context(question(), ctx, answerer) for _ in range(4)]
        assert [r.answer for r in errors] == [None, None, None, None]
        assert "cut off by the token limit" in errors[0].error
        assert "unterminated <think>" in errors[1].error
        assert "empty answer once think-blocks are removed" in errors[2].error
        assert "not valid Unicode" in errors[3].error
        ok = answer_with_context(question(), ctx, answerer)
        assert ok.answer == "A golden retriever." and ok.error is None
    finally:
        server.close()


def test_llm_answerer_rerun_asks_again_after_an_unusable_reply(bank, tmp_path):
    # --resume --retry-errors: the failed question must reach the server again, not the cache
    server = ChatServer()
    try:
        cache = str(tmp_path / "answers.sqlite")
        server.script.extend([("A golden", "length"), "<think>hmm", "A golden retriever."])
        ctx = build_answer_context(bank, question(), current_date=datetime(2023, 10, 22))
        for _ in range(2):
            answerer = LLMAnswerer(server.client(cache_path=cache), model="answer-model")
            assert answer_with_context(question(), ctx, answerer).error is not None
        answerer = LLMAnswerer(server.client(cache_path=cache), model="answer-model")
        assert answer_with_context(question(), ctx, answerer).answer == "A golden retriever."
        assert len(server.requests) == 3
        # the usable answer is cached: a fourth run is served without a request
        answerer = LLMAnswerer(server.client(cache_path=cache), model="answer-model")
        assert answer_with_context(question(), ctx, answerer).answer == "A golden retriever."
        assert len(server.requests) == 3 and answerer.client.usage().cache_hits == 1
    finally:
        server.close()
