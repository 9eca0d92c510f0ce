"""Two baselines that answer from the raw conversation instead of built memory.

RAG over raw turns: each session is cut into chunks of consecutive turns (at most `max_turns`
turns and, when more than one turn, at most `max_chars` characters; a single longer turn is its
own chunk, never cut), each chunk headed by the session date and listing "Speaker: text" lines.
The chunks are stored as episodic entries of an ordinary `MemoryBank` (event time = session
date, `session_id` = the session), one atomic batch per session, so they are searched by the
same hybrid index (BM25 + embeddings, RRF) as built memory, saved in the same SQLite files, and
answered through the same answer step (`membuilder.answering`) with top-5 chunks; their kind is
reported as "raw" so attribution never counts them as episodic memory.

Full context: every session rendered as text, oldest first, when the whole history fits a
character budget. When it does not, `policy="skip"` raises `ContextTooLong` (the runner records
the question as skipped, saying why) and `policy="truncate"` keeps the most recent sessions that
fit and says in the prompt that older ones were left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Sequence

from tqdm import tqdm

from membuilder.answering import (
    AnswerContext,
    build_answer_context,
    format_date,
    question_current_date,
)
from membuilder.bank import MemoryBank, SearchResult
from membuilder.datasets import NOT_ANSWERABLE, Conversation, Question, Session
from membuilder.operations import Add
from membuilder.types import MemoryEntry, MemoryKind, Status, normalise_time

__all__ = [
    "RAG_TOP_K", "RAW_LABEL", "SESSION_LABEL", "TurnChunk", "chunk_session", "chunk_conversation",
    "index_turns", "rag_context", "ContextTooLong", "render_session", "full_context",
    "DEFAULT_FULL_CONTEXT_CHARS",
]

RAG_TOP_K = 5
RAW_LABEL = "raw"
SESSION_LABEL = "session"
DEFAULT_MAX_TURNS = 4
DEFAULT_MAX_CHARS = 2000
DEFAULT_FULL_CONTEXT_CHARS = 200_000  # ~50k tokens: every LoCoMo conversation fits, LongMemEval_S does not


@dataclass(frozen=True)
class TurnChunk:
    session_id: str
    date: datetime | None
    turn_ids: tuple[str, ...]
    text: str


def _session_header(session: Session) -> str:
    return f"Session date: {session.date_text or format_date(session.date) or 'unknown'}"


def chunk_session(session: Session, *, max_turns: int = DEFAULT_MAX_TURNS,
                  max_chars: int = DEFAULT_MAX_CHARS) -> list[TurnChunk]:
    """Consecutive-turn chunks of one session (see the module docstring for the limits)."""
    if max_turns < 1 or max_chars < 1:
        raise ValueError(f"max_turns and max_chars must be >= 1, got {max_turns}, {max_chars}")
    header = _session_header(session)
    chunks: list[TurnChunk] = []
    lines: list[str] = []
    ids: list[str] = []
    size = 0

    def flush():
        if lines:
            chunks.append(TurnChunk(session.session_id, session.date, tuple(ids),
                                    "\n".join([header, *lines])))
            lines.clear()
            ids.clear()

    for message in session.messages:
        line = f"{message.speaker}: {message.text}"
        if lines and (len(lines) >= max_turns or size + len(line) > max_chars):
            flush()
            size = 0
        lines.append(line)
        ids.append(message.turn_id)
        size += len(line)
    flush()
    return chunks


def chunk_conversation(conversation: Conversation, *, max_sessions: int | None = None,
                       max_turns: int = DEFAULT_MAX_TURNS,
                       max_chars: int = DEFAULT_MAX_CHARS) -> list[TurnChunk]:
    sessions = conversation.sessions[:max_sessions] if max_sessions is not None else conversation.sessions
    return [c for s in sessions for c in chunk_session(s, max_turns=max_turns, max_chars=max_chars)]


def index_turns(bank: MemoryBank, conversation: Conversation, *, max_sessions: int | None = None,
                max_turns: int = DEFAULT_MAX_TURNS, max_chars: int = DEFAULT_MAX_CHARS,
                progress: bool = False) -> int:
    """Store the conversation's turn chunks in `bank` (one batch per session); returns the count."""
    if len(bank) or bank.core:
        raise ValueError(f"bank of {bank.owner!r} is not empty; RAG chunks go into a fresh bank")
    sessions = conversation.sessions[:max_sessions] if max_sessions is not None else conversation.sessions
    total = 0
    for session in tqdm(sessions, desc=f"index {conversation.conversation_id}", disable=not progress,
                        leave=False):
        chunks = chunk_session(session, max_turns=max_turns, max_chars=max_chars)
        when = normalise_time(session.date)
        if chunks:
            bank.apply([Add(MemoryKind.EPISODIC, c.text, when) for c in chunks],
                       session_id=session.session_id)
        total += len(chunks)
    return total


def rag_context(bank: MemoryBank, question: Question, *, k: int = RAG_TOP_K,
                current_date: datetime | date | None = None) -> AnswerContext:
    """Top-`k` turn chunks for `question`, oldest first, in the standard answer prompt."""
    return build_answer_context(bank, question, k=k, current_date=current_date, hit_label=RAW_LABEL)


# --- full context -----------------------------------------------------------------------------------


class ContextTooLong(ValueError):
    """The whole conversation does not fit the full-context character budget."""

    def __init__(self, conversation_id: str, chars: int, budget: int):
        super().__init__(f"{conversation_id}: full context is {chars} characters, over the budget of "
                         f"{budget}; does not fit")
        self.chars, self.budget = chars, budget


def render_session(session: Session) -> str:
    lines = [f"{m.speaker}: {m.text}" for m in session.messages]
    return "\n".join([f"=== {session.session_id} ({session.date_text or 'date unknown'}) ===", *lines])


_FULL_SYSTEM = (
    "You answer questions about a user from the full history of their past conversations, given "
    "oldest first with the date of each session. Use only this history. Answer briefly (a phrase "
    "or one sentence), resolving relative time expressions against the session's date. If the "
    f"history holds nothing relevant to the question, answer exactly: {NOT_ANSWERABLE}"
)


def full_context(conversation: Conversation, question: Question, *,
                 max_chars: int = DEFAULT_FULL_CONTEXT_CHARS, max_sessions: int | None = None,
                 policy: str = "skip", current_date: datetime | date | None = None) -> AnswerContext:
    """The whole conversation (first `max_sessions` sessions) as the answer context.

    Each session is one hit (label "session"), so extractive answering and attribution see the
    same units the prompt shows. Raises `ContextTooLong` under `policy="skip"` when it does not fit.
    """
    if policy not in ("skip", "truncate"):
        raise ValueError(f"policy must be 'skip' or 'truncate', got {policy!r}")
    sessions: Sequence[Session] = (conversation.sessions[:max_sessions] if max_sessions is not None
                                   else conversation.sessions)
    texts = [render_session(s) for s in sessions]
    total = sum(len(t) + 2 for t in texts)
    kept = list(range(len(texts)))
    if total > max_chars:
        if policy == "skip":
            raise ContextTooLong(conversation.conversation_id, total, max_chars)
        size, kept = 0, []
        for i in reversed(range(len(texts))):
            if size + len(texts[i]) + 2 > max_chars:
                break
            size += len(texts[i]) + 2
            kept.insert(0, i)
    hits = [SearchResult(_session_entry(conversation.conversation_id, sessions[i], texts[i]), 0.0, None, None)
            for i in kept]
    when, inferred = question_current_date(question, current_date)
    omitted = len(texts) - len(kept)
    parts = []
    if omitted:
        parts.append(f"(The {omitted} oldest session(s) did not fit and are left out.)")
    parts.append("\n\n".join(texts[i] for i in kept) if kept else "(no sessions)")
    if when is not None:
        note = (" (the question has no date of its own: this is the date of the last conversation "
                "session)" if inferred else "")
        parts.append(f"Current date: {when}{note}")
    parts.append(f"Question: {question.question}\nAnswer:")
    prompt = [{"role": "system", "content": _FULL_SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]
    return AnswerContext(core="", hits=hits, question_date=when, prompt=prompt, date_is_inferred=inferred,
                         hit_label=SESSION_LABEL)


def _session_entry(owner: str, session: Session, text: str) -> MemoryEntry:
    return MemoryEntry(id=session.session_id, owner=owner, kind=MemoryKind.EPISODIC, text=text,
                       status=Status.ACTIVE, session_id=session.session_id,
                       event_time=normalise_time(session.date), created_at=0.0, updated_at=0.0)
