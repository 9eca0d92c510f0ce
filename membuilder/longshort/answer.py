"""The answer agent: short-term state + retrieved long-term memories + query -> answer.

Both answerers follow `membuilder.answering.Answerer` (`name`, `answer(question, context)`), and
take the `AnswerContext` of `build_answer_context`: in a long/short-term bank its `core` is the
short-term state and its `hits` are the long-term memories (`membuilder.longshort.builder`), so
`benchmarks.eval_memory`, `reward` and every judge use them unchanged.

- `LongShortAnswerer`: a chat model through `LLMClient`, with the `chat` mode prompt of
  `membuilder.longshort.prompts`; a reply cut off, still thinking or empty raises
  `UnusableAnswerError` (an error, never an answer to judge), as `LLMAnswerer` does.
- `OfflineAnswerAgent`: the offline stand-in. `ExtractiveAnswerer` reads retrieved entries only;
  this one also reads the state, one line per pseudo-entry ranked after every retrieved memory,
  so a fact that only the short-term state holds can still be answered offline.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from membuilder.answering import (
    AnswerContext,
    ExtractiveAnswerer,
    UnusableAnswerError,
    unusable_answer_reason,
)
from membuilder.bank import SearchResult
from membuilder.datasets import Question
from membuilder.llm import LLMClient
from membuilder.thinking import strip_think_blocks
from membuilder.types import MemoryEntry, MemoryKind, Status

from .prompts import render_chat


class LongShortAnswerer:
    """The answer agent on any OpenAI-compatible chat model (module doc). Thread-safe."""

    def __init__(self, client: LLMClient, model: str | None = None, *, temperature: float = 0.0,
                 max_tokens: int = 256):
        self.client = client
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.name = f"longshort-llm:{model or client.config.model or '?'}"

    def prompt(self, question: Question, context: AnswerContext) -> list[dict]:
        return render_chat(question.question, context.core, [h.entry for h in context.hits],
                           context.question_date).messages

    def answer(self, question: Question, context: AnswerContext) -> str:
        result = self.client.chat(self.prompt(question, context), model=self.model, temperature=self.temperature,
                                  max_tokens=self.max_tokens,
                                  cache_if=lambda r: unusable_answer_reason(r) is None)
        reason = unusable_answer_reason(result)
        if reason is not None:
            raise UnusableAnswerError(reason)
        return strip_think_blocks(result.text).text.strip()


def state_entries(state: str, owner: str = "") -> list[MemoryEntry]:
    """The state's non-empty lines as pseudo-entries (ids "state:<n>"), for offline reading."""
    lines = [x.strip() for x in state.split("\n") if x.strip()]
    return [MemoryEntry(id=f"state:{i}", owner=owner, kind=MemoryKind.CORE, text=line, status=Status.ACTIVE,
                        session_id=None, event_time=None, created_at=0.0, updated_at=0.0)
            for i, line in enumerate(lines)]


@dataclass
class OfflineAnswerAgent:
    """Extractive answer over long-term hits, then the state's lines (module doc)."""

    min_overlap: float = 0.25
    max_answer_words: int = 40
    name: str = field(default="longshort-offline", init=False)

    def __post_init__(self):
        self._reader = ExtractiveAnswerer(min_overlap=self.min_overlap, max_answer_words=self.max_answer_words)

    def answer(self, question: Question, context: AnswerContext) -> str:
        floor = min((h.score for h in context.hits), default=0.0)
        # below every retrieved memory, so a retrieved memory wins a tie on overlap
        extra = [SearchResult(e, floor - 1.0 - i, None, None) for i, e in enumerate(state_entries(context.core))]
        return self._reader.answer(question, replace(context, hits=list(context.hits) + extra))
