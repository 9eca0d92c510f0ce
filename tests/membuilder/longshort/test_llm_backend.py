"""LLMRoleBackend's bounded repair, the answer agent, and the prompt renderer's three modes."""

import json
from datetime import datetime
from types import SimpleNamespace

import pytest

from membuilder.agents.backends import AgentGenerationError
from membuilder.answering import AnswerContext, UnusableAnswerError
from membuilder.bank import MemoryBank
from membuilder.datasets import Message, Question, Session
from membuilder.llm import ChatResult, LLMError, TokenUsage
from membuilder.longshort import LLMRoleBackend, LongShortAnswerer, LongShortBuilder, RoleContext, render
from membuilder.store import InMemoryStore

SESSION = Session("s1", datetime(2023, 5, 8), None, (Message("Ann", "user", "I adopted a cat named Tom.", "s1:0"),))


class FakeClient:
    """Returns scripted (text, finish_reason) replies and records the calls."""

    def __init__(self, *replies):
        self.replies = list(replies)
        self.calls = []
        self.config = SimpleNamespace(model="fake")

    def chat(self, messages, **kw):
        self.calls.append((messages, kw))
        item = self.replies.pop(0)
        if isinstance(item, Exception):
            raise item
        text, finish = item if isinstance(item, tuple) else (item, "stop")
        return ChatResult(text, finish, TokenUsage(), None, False, "fake")


def ctx(**kw):
    return RoleContext(owner="u", session=SESSION, session_index=0, annotation=None, state="", **kw)


def test_unparsable_answer_is_repaired_with_feedback_then_used():
    good = json.dumps({"important": ["Ann adopted a cat named Tom."], "unimportant": []})
    client = FakeClient("Sure! facts: cat", good)
    reply = LLMRoleBackend(client, constrained=True).generate_reply("splitter", [{"role": "user", "content": "x"}],
                                                                  context=ctx())
    assert reply.text == good and reply.attempts == ("Sure! facts: cat",)
    second_messages, kw = client.calls[1]
    assert second_messages[-2] == {"role": "assistant", "content": "Sure! facts: cat"}
    assert "no JSON object found" in second_messages[-1]["content"]
    assert kw["use_cache"] is False and kw["response_format"]["json_schema"]["name"] == "longshort_splitter"


def test_repair_is_bounded_and_truncation_is_never_parsed():
    client = FakeClient("bad", "worse")
    with pytest.raises(AgentGenerationError, match="no valid output after 2 attempt"):
        LLMRoleBackend(client, max_parse_retries=1).generate_reply("splitter", [], context=ctx())
    client = FakeClient(('{"important": ["a"], "unimportant": []}', "length"))
    with pytest.raises(AgentGenerationError, match="cut at max_tokens"):
        LLMRoleBackend(client).generate_reply("splitter", [], context=ctx())
    client = FakeClient(LLMError("server down"))
    with pytest.raises(AgentGenerationError, match="server down"):
        LLMRoleBackend(client).generate_reply("splitter", [], context=ctx())


def test_over_long_state_is_usable_so_the_builder_can_consolidate():
    client = FakeClient(json.dumps({"state": "x" * 20}))
    reply = LLMRoleBackend(client).generate_reply("short_term", [], context=ctx(state_limit=10))
    assert reply.attempts == ()  # not re-asked: the over-long state goes to the consolidation step


def test_builder_on_the_llm_backend_end_to_end():
    client = FakeClient(json.dumps({"important": ["Ann adopted a cat named Tom."], "unimportant": ["Ann waved."]}),
                        json.dumps({"decisions": [{"fact": 0, "action": "ADD", "memory": "Ann adopted a cat named Tom."}]}),
                        json.dumps({"state": "Ann waved."}))
    bank = MemoryBank(InMemoryStore(), "u")
    rec = LongShortBuilder(LLMRoleBackend(client)).add_session(bank, SESSION)
    assert [e.text for e in bank.entries()] == ["Ann adopted a cat named Tom."] and bank.core == "Ann waved."
    assert rec.backend == "llm:fake" and json.loads(json.dumps(rec.to_dict()))["agents"]["long_term"]["valid"]


def test_answer_agent_prompt_and_unusable_reply():
    q = Question("q", "What is the cat called?", "Tom", "1", (), None, False)
    context = AnswerContext(core="Ann waved.", hits=[], question_date="8 May 2023", prompt=[])
    answerer = LongShortAnswerer(FakeClient("<think>hm</think> Tom"))
    assert answerer.answer(q, context) == "Tom"
    user = answerer.prompt(q, context)[1]["content"]
    assert "Short-term memory state:\nAnn waved." in user and "Long-term memories (oldest first):\n(none)" in user
    with pytest.raises(UnusableAnswerError):
        LongShortAnswerer(FakeClient(("Tom", "length"))).answer(q, context)


def test_renderer_modes():
    assert render("chat", query="q?", state="", memories=[]).mode == "chat"
    c = render("consolidation", state="y" * 50, state_limit=40)
    assert c.mode == "consolidation" and "50 characters, over the limit of 40" in c.messages[0]["content"]
    op = render("operations", role="splitter", session=SESSION, state="", query="Where is Tom?")
    assert "Current query: Where is Tom?" in op.messages[1]["content"] and '"important"' in op.messages[0]["content"]
    with pytest.raises(ValueError, match="unknown mode"):
        render("poetry")
    with pytest.raises(ValueError, match="needs role="):
        render("operations", role="answer")
