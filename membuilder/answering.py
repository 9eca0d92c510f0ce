"""The answer step (DESIGN section 3): retrieve, order by event time, prompt, answer.

For a question: the top-k (default 10) entries of the owner's bank are retrieved with the
question as query; they are shown oldest first (by event time; entries of unknown time last,
in retrieval order among themselves), after the core block; the prompt states the current date
(the question's date when the dataset gives one; otherwise a date the caller supplies, e.g.
LoCoMo's last session date, and the prompt says it is that); the agreed answer when memory holds
nothing relevant is `NOT_ANSWERABLE` ("Not answerable").

Answerers:
- `LLMAnswerer`: any OpenAI-compatible chat model through `membuilder.llm.LLMClient`; a reply
  cut off, still thinking or empty is an error (`UnusableAnswerError`), never an answer to judge;
- `ExtractiveAnswerer`: offline and deterministic, no model. It answers with the retrieved
  sentence that shares the largest fraction of the question's content words (ties: the better
  retrieval rank, then the earlier sentence), prefixed with that entry's event date; below
  `min_overlap` it answers "Not answerable". It is a floor for the pipeline, not a reader.
  Answers are bounded: a sentence longer than `max_answer_words` (40) whitespace words is cut into
  consecutive pieces of that many words, each then a sentence of its own. The cut does not depend
  on the question, so a memory written as one giant "sentence" answers no better than the same
  words written as sentences. Without the bound such a memory (a whole session transcript with
  its full stops removed, a list of every name mentioned) was returned whole for every question,
  and a containment judge (`RuleJudge`) then found any gold answer inside it:
  a reward an RL policy could farm (measured in benchmarks/results/reward.md).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Protocol, Sequence

from membuilder.bank import MemoryBank, SearchResult
from membuilder.datasets import NOT_ANSWERABLE, Question
from membuilder.llm import ChatResult, LLMClient, LLMError
from membuilder.thinking import strip_think_blocks
from membuilder.retrieval import tokenize
from membuilder.types import time_to_posix

__all__ = [
    "AnswerContext", "AnswerRecord", "Answerer", "ExtractiveAnswerer", "LLMAnswerer",
    "answer_question", "answer_with_context", "build_answer_context", "order_by_event_time",
    "render_answer_prompt", "format_date", "question_current_date", "kinds_count", "content_words",
    "UnusableAnswerError", "unusable_answer_reason",
]

DEFAULT_TOP_K = 10
MAX_QUESTION_QUERY_CHARS = 2000


@dataclass(frozen=True)
class AnswerContext:
    """What the answerer sees. `hits` are ordered by event time, unknown times last."""

    core: str
    hits: list[SearchResult]
    question_date: str | None
    prompt: list[dict]
    date_is_inferred: bool = False  # True when `question_date` is not the question's own date
    hit_label: str | None = None  # overrides the entries' kinds in records (e.g. "raw" for RAG)

    @property
    def text(self) -> str:
        """Everything the answerer is shown from memory, as one string (for retrieval recall)."""
        return "\n".join([self.core, *(h.entry.text for h in self.hits)])


@dataclass(frozen=True)
class AnswerRecord:
    question_id: str
    answer: str | None  # None exactly when `error` is set
    context_ids: tuple[str, ...]  # in the order shown to the answerer
    kinds_of_hits: tuple[str, ...]  # parallel to context_ids
    error: str | None = None


class Answerer(Protocol):
    name: str

    def answer(self, question: Question, context: AnswerContext) -> str: ...


# --- context --------------------------------------------------------------------------------------


def order_by_event_time(hits: Sequence[SearchResult]) -> list[SearchResult]:
    """Oldest event first; entries with unknown time after all dated ones, keeping their order."""
    def key(item: tuple[int, SearchResult]):
        pos, hit = item
        t = time_to_posix(hit.entry.event_time)
        return (1, 0.0, pos) if math.isnan(t) else (0, t, pos)

    return [hit for _, hit in sorted(enumerate(hits), key=key)]


def format_date(value: datetime | date | str | None, *, with_time: bool = True) -> str | None:
    """'8 May 2023' for a date (with ', 13:56' when a datetime has a time of day and `with_time`)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value) if len(value) > 10 else date.fromisoformat(value)
    text = f"{value.day} {value.strftime('%B')} {value.year}"
    if with_time and isinstance(value, datetime) and (value.hour or value.minute):
        text += f", {value.hour:02d}:{value.minute:02d}"
    return text


_SYSTEM = (
    "You answer questions about a user from their long-term memory: a core block about them and "
    "memory entries retrieved from past conversations. Use only this memory. Answer briefly (a "
    "phrase or one sentence). Resolve relative time expressions ('yesterday', 'last week') against "
    "the date of the memory they appear in and give absolute dates. If the memory holds nothing "
    f"relevant to the question, answer exactly: {NOT_ANSWERABLE}"
)


def render_answer_prompt(question: Question, core: str, hits: Sequence[SearchResult],
                         current_date: str | None, *, date_is_inferred: bool = False) -> list[dict]:
    """The answer prompt: core block, dated entries oldest first, current date, question."""
    lines = []
    for hit in hits:
        when = format_date(hit.entry.event_time) or "date unknown"
        lines.append(f"- [{hit.entry.id} | {hit.entry.kind.value} | {when}] {hit.entry.text}")
    parts = [f"Core memory:\n{core.strip() or '(empty)'}",
             "Retrieved memories (oldest first):\n" + ("\n".join(lines) if lines else "(none)")]
    if current_date is not None:
        note = (" (the question has no date of its own: this is the date of the last conversation "
                "session)" if date_is_inferred else "")
        parts.append(f"Current date: {current_date}{note}")
    parts.append(f"Question: {question.question}\nAnswer:")
    return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


def question_current_date(question: Question, fallback: datetime | date | None) -> tuple[str | None, bool]:
    """(current date text, inferred?): the question's own date, else `fallback` (inferred)."""
    if question.question_date is not None:
        return format_date(question.question_date), False
    if fallback is not None:
        return format_date(fallback), True
    return None, False


def build_answer_context(bank: MemoryBank, question: Question, *, k: int = DEFAULT_TOP_K,
                         current_date: datetime | date | None = None,
                         hit_label: str | None = None) -> AnswerContext:
    """Retrieve the top-`k` entries for `question` and render the answer prompt.

    `current_date` is used only when the question carries no date (LoCoMo: pass the date of the
    last session in memory); the prompt then says the date is inferred.
    """
    if not isinstance(question, Question):
        raise TypeError(f"question must be a membuilder.datasets.Question, got {type(question).__name__}")
    hits = order_by_event_time(bank.search(question.question[:MAX_QUESTION_QUERY_CHARS], k=k))
    when, inferred = question_current_date(question, current_date)
    core = bank.core
    prompt = render_answer_prompt(question, core, hits, when, date_is_inferred=inferred)
    return AnswerContext(core=core, hits=hits, question_date=when, prompt=prompt,
                         date_is_inferred=inferred, hit_label=hit_label)


def answer_with_context(question: Question, context: AnswerContext, answerer: Answerer) -> AnswerRecord:
    """Ask `answerer`; an `LLMError` becomes a record with `error` (never an answer text)."""
    ids = tuple(h.entry.id for h in context.hits)
    kinds = tuple(context.hit_label or h.entry.kind.value for h in context.hits)
    try:
        answer = answerer.answer(question, context)
    except LLMError as exc:
        return AnswerRecord(question.question_id, None, ids, kinds, error=f"answer call failed: {exc}")
    if not isinstance(answer, str):
        raise TypeError(f"answerer {answerer.name} returned {type(answer).__name__}, not str")
    return AnswerRecord(question.question_id, answer, ids, kinds)


def answer_question(bank: MemoryBank, question: Question, answerer: Answerer, *, k: int = DEFAULT_TOP_K,
                    current_date: datetime | date | None = None) -> AnswerRecord:
    """Retrieve, prompt and answer one question from `bank`."""
    context = build_answer_context(bank, question, k=k, current_date=current_date)
    return answer_with_context(question, context, answerer)


# --- answerers ------------------------------------------------------------------------------------

class UnusableAnswerError(LLMError):
    """The answer model replied, but with no usable answer (cut off, still thinking, empty).

    An `LLMError`, so `answer_with_context` records it as an error: such a question is neither
    right nor wrong, and a rerun that retries errors asks the model again.
    """


def unusable_answer_reason(result: ChatResult) -> str | None:
    """Why a completion holds no usable answer, or None when its visible text is the answer.

    Unusable: cut by the token limit (`finish_reason="length"`: the answer may be partial), a
    `<think>` block never closed (the model stopped while thinking), nothing left once the
    think-blocks are removed (`membuilder.thinking`, the rules the agents' parser uses too: text
    before an orphan `</think>` is thinking, never the answer), or text that is not valid Unicode.
    """
    if result.truncated:
        return "the answer was cut off by the token limit (finish_reason=length)"
    stripped = strip_think_blocks(result.text)
    if stripped.unterminated:
        return "the answer model stopped inside an unterminated <think> block"
    if not stripped.text.strip():
        what = " once think-blocks are removed" if result.text.strip() else ""
        return f"the answer model returned an empty answer{what} (finish_reason={result.finish_reason})"
    try:
        stripped.text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: no record or judge could take it
        return f"the answer is not valid Unicode (lone surrogate {exc.object[exc.start]!r} at {exc.start})"
    return None


class LLMAnswerer:
    """Answers with a chat model; the reply's visible text (think-blocks removed, stripped) is the
    answer. A reply without a usable answer (`unusable_answer_reason`) raises
    `UnusableAnswerError`, and is never served from, nor written to, the response cache."""

    def __init__(self, client: LLMClient, model: str | None = None, *, temperature: float = 0.0,
                 max_tokens: int = 256):
        self.client = client
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.name = f"llm:{model or client.config.model}"

    def answer(self, question: Question, context: AnswerContext) -> str:
        result = self.client.chat(context.prompt, model=self.model, temperature=self.temperature,
                                  max_tokens=self.max_tokens,
                                  cache_if=lambda r: unusable_answer_reason(r) is None)
        problem = unusable_answer_reason(result)
        if problem is not None:
            raise UnusableAnswerError(problem)
        return strip_think_blocks(result.text).text.strip()


# Function words that say nothing about which memory answers a question.
_STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have
having he her here hers herself him himself his how i if in into is it its itself just me more most
my myself no nor not now of off on once only or other our ours ourselves out over own same she
should so some such than that the their theirs them themselves then there these they this those
through to too under until up very was we were what when where which while who whom why will with
would you your yours yourself yourselves ever kind much many also s t d ll m re ve
""".split())
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


def content_words(text: str) -> set[str]:
    return {t for t in tokenize(text) if t not in _STOPWORDS}


@dataclass
class ExtractiveAnswerer:
    """Offline extractive answerer (module docstring). `min_overlap` is the fraction of the
    question's content words the best sentence must contain; below it: "Not answerable".
    `max_answer_words` bounds the answer (a longer sentence is cut into pieces that long)."""

    min_overlap: float = 0.25
    max_answer_words: int = 40
    name: str = field(default="extractive", init=False)

    def __post_init__(self):
        if not 0.0 < self.min_overlap <= 1.0:
            raise ValueError(f"min_overlap must be in (0, 1], got {self.min_overlap}")
        if isinstance(self.max_answer_words, bool) or not isinstance(self.max_answer_words, int) \
                or self.max_answer_words < 1:
            raise ValueError(f"max_answer_words must be an integer >= 1, got {self.max_answer_words!r}")

    def _pieces(self, text: str) -> list[str]:
        """The sentences of `text`, each longer than `max_answer_words` words cut into consecutive
        pieces of that many words (boundaries that do not depend on the question)."""
        pieces = []
        for sentence in _SENTENCE.split(text):
            words = sentence.split()
            if len(words) <= self.max_answer_words:
                if words:
                    pieces.append(sentence.strip())
                continue
            pieces += [" ".join(words[i:i + self.max_answer_words])
                       for i in range(0, len(words), self.max_answer_words)]
        return pieces

    def answer(self, question: Question, context: AnswerContext) -> str:
        wanted = content_words(question.question)
        if not wanted:
            return NOT_ANSWERABLE
        # retrieval rank decides ties, not the event-time order the hits are shown in
        ranked = sorted(context.hits, key=lambda h: -h.score)
        best: tuple[float, int, int] | None = None
        best_text, best_hit = "", None
        for rank, hit in enumerate(ranked):
            for pos, sentence in enumerate(self._pieces(hit.entry.text)):
                overlap = len(wanted & content_words(sentence)) / len(wanted)
                key = (-overlap, rank, pos)
                if best is None or key < best:
                    best, best_text, best_hit = key, sentence, hit
        if best is None or -best[0] < self.min_overlap:
            return NOT_ANSWERABLE
        when = format_date(best_hit.entry.event_time, with_time=False)
        return f"[{when}] {best_text}" if when else best_text


def kinds_count(record: AnswerRecord) -> dict[str, int]:
    """How many retrieved entries of each kind the answer was given (attribution counts these)."""
    counts: dict[str, int] = {}
    for kind in record.kinds_of_hits:
        counts[kind] = counts.get(kind, 0) + 1
    return counts

