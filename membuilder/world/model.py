"""Value types of the synthetic world: what each session should change in memory, and its QA."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterator

from membuilder.datasets import NOT_ANSWERABLE, Conversation, Question
from membuilder.types import MemoryKind

QTYPES = ("single-session", "cross-session", "temporal", "knowledge-update", "abstention")
SOURCE = "world"


@dataclass(frozen=True)
class CoreIntent:
    """One line of the core block: added (`old` None) or replacing the line `old`."""

    fact: str
    new: str
    old: str | None = None
    attr: str = ""  # the attribute a change changed ("" for an introduction)


@dataclass(frozen=True)
class EntryIntent:
    """One change to searchable memory, by text: the expert turns texts into ids.

    `replaces` empty: a new entry; one text: UPDATE of the entry holding it; two or more (episodic):
    MERGE of the entries holding them. `restate`: the session repeats the stored `text` (SKIP).
    """

    fact: str
    kind: MemoryKind
    text: str
    time: str | None = None  # ISO date of the event
    replaces: tuple[str, ...] = ()
    restate: bool = False
    attr: str = ""  # the attribute a change changed or added ("" for an introduction)


@dataclass(frozen=True)
class WorldQA:
    """One question with its exact gold answer.

    `session_index` is the session after which it is asked (conversation-level questions: the
    last one); `evidence_sessions` are the ids of the sessions that stated or changed what it asks.
    """

    question_id: str
    question: str
    answer: str
    qtype: str
    question_date: datetime
    evidence_sessions: tuple[str, ...]
    evidence_turns: tuple[str, ...]
    fact: str
    session_index: int
    attr: str = ""  # what of the fact it asks about (the attribute name)

    @property
    def is_abstention(self) -> bool:
        return self.qtype == "abstention"

    def to_question(self) -> Question:
        """As a `membuilder.datasets.Question` (category = the QA type) for `benchmarks.eval_memory`."""
        return Question(question_id=self.question_id, question=self.question, answer=self.answer,
                        category=self.qtype, evidence=self.evidence_turns,
                        question_date=self.question_date, is_abstention=self.is_abstention,
                        evidence_sessions=self.evidence_sessions,
                        question_date_text=self.question_date.date().isoformat())

    def to_dict(self) -> dict:
        """The `reward.types.QAPair` form: question, answer, qtype, source, question_date, question_id."""
        return {"question": self.question, "answer": self.answer, "qtype": self.qtype, "source": SOURCE,
                "question_date": self.question_date.date().isoformat(), "question_id": self.question_id}


@dataclass(frozen=True)
class SessionPlan:
    """What session `session_index` adds to memory (the expert's ground truth) and its QA."""

    session_id: str
    session_index: int
    core: tuple[CoreIntent, ...]
    entries: tuple[EntryIntent, ...]
    core_after: str  # the core block once this session is applied (no fallbacks taken)
    qa: tuple[WorldQA, ...]

    def entries_of(self, kind: MemoryKind) -> tuple[EntryIntent, ...]:
        return tuple(e for e in self.entries if e.kind is kind)


@dataclass(frozen=True)
class WorldConversation:
    """One generated conversation: the dataset view, the per-session plans, and the people."""

    conversation: Conversation
    plans: tuple[SessionPlan, ...]
    qa: tuple[WorldQA, ...] = ()  # the conversation-level questions (`conversation.questions` as WorldQA)
    profiles: dict = field(default_factory=dict, compare=False)  # person -> final attributes (for reading)

    @property
    def conversation_id(self) -> str:
        return self.conversation.conversation_id

    def session_qa(self, index: int) -> list[dict]:
        """Session `index`'s QA as `reward.types.QAPair` dicts."""
        return [q.to_dict() for q in self.plans[index].qa]


@dataclass(frozen=True)
class World:
    """A generated world: conversations with plans, reproducible from (`seed`, sizes)."""

    seed: int
    conversations: tuple[WorldConversation, ...]
    _plans: dict = field(default=None, init=False, repr=False, compare=False)

    def __iter__(self) -> Iterator[WorldConversation]:
        return iter(self.conversations)

    def __len__(self) -> int:
        return len(self.conversations)

    def dataset(self) -> list[Conversation]:
        """The conversations in the internal dataset format (questions = conversation-level QA)."""
        return [w.conversation for w in self.conversations]

    def plan(self, session_id: str) -> SessionPlan:
        """The plan of a session by its id (ids are unique across the world)."""
        if self._plans is None:
            object.__setattr__(self, "_plans", {p.session_id: p for w in self.conversations for p in w.plans})
        try:
            return self._plans[session_id]
        except KeyError:
            raise KeyError(f"session {session_id!r} is not part of this world (seed {self.seed})") from None


ABSTENTION_ANSWER = NOT_ANSWERABLE
