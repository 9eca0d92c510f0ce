"""The prompt renderer of the long/short-term architecture, in its three modes.

- `operations`: the memory-writing agents (splitter, long-term, short-term), each told its JSON
  schema (`membuilder.longshort.schema`);
- `chat`: the answer agent (short-term state + retrieved long-term memories + query -> answer);
- `consolidation`: the short-term state's compression step, asked when an answer's state is over
  the limit (one bounded call; the state is never cut by code).

A transcript longer than the prompt budget keeps its first turns and ends in a marker naming the
turns left out (`membuilder.agents.prompts.fit_transcript`): nothing is dropped silently, and the
builder records the omitted turn ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

from membuilder.agents.prompts import fit_transcript
from membuilder.answering import format_date
from membuilder.datasets import NOT_ANSWERABLE, Session
from membuilder.types import MemoryEntry

from .schema import LONG_TERM_SCHEMA, SPLITTER_SCHEMA, short_term_schema

MODES = ("operations", "chat", "consolidation")
DEFAULT_MAX_TRANSCRIPT_CHARS = 24000
DEFAULT_MAX_ENTRY_CHARS = 400


@dataclass(frozen=True)
class RenderedPrompt:
    mode: str
    role: str
    messages: list[dict]
    omitted_turns: tuple[str, ...] = ()


def _schema_text(schema: dict) -> str:
    return json.dumps(schema, ensure_ascii=False)


_SPLITTER = (
    "You are the fact splitter of a memory system. Read the new conversation text and list the "
    "facts it states, each as one self-contained sentence naming who it is about (never 'he', "
    "'I'). Put a fact under \"important\" when it is durable and worth keeping long-term (identity, "
    "relations, preferences, possessions, plans, dated events, changes to earlier facts) and is "
    "NEW: a fact the current memory state already holds, small talk and passing remarks go under "
    "\"unimportant\" (they only update the short-term state). Resolve relative dates against the "
    "session date. An important fact that turns out to be already known costs you. Answer with one "
    "JSON object following this schema and nothing else:\n{schema}"
)

_LONG_TERM = (
    "You are the long-term memory agent. For each numbered important fact you are shown the "
    "stored memories most similar to it. Decide one action per fact: ADD a new memory (the fact "
    "is new), UPDATE a shown memory (the fact changes or refines it: give the full new text), "
    "DELETE a shown memory (the fact says it is no longer true and nothing replaces it), or NOOP "
    "(the memory already holds it). Name only ids shown with that fact, and each id at most once. "
    "Answer with one JSON object following this schema and nothing else:\n{schema}"
)

_SHORT_TERM = (
    "You are the short-term memory agent. Fold the new minor facts into the memory state: a "
    "compact running summary of recent, less important context. Keep what may still matter, drop "
    "what is stale, merge repetitions. The new state must have at most {limit} characters. Answer "
    "with one JSON object following this schema and nothing else:\n{schema}"
)

_CONSOLIDATE = (
    "The short-term memory state below has {length} characters, over the limit of {limit}. "
    "Rewrite it in at most {target} characters, keeping the most useful information (recent and "
    "specific facts first). Answer with one JSON object following this schema and nothing else:\n{schema}"
)

_CHAT = (
    "You answer questions about a user from their memory: a short-term memory state (recent "
    "context) and long-term memories retrieved for the question. Use only this memory. Answer "
    "briefly (a phrase or one sentence), with absolute dates. If the memory holds nothing relevant, "
    f"answer exactly: {NOT_ANSWERABLE}"
)


def _date(session: Session) -> str:
    when = format_date(session.date) if session.date is not None else session.date_text
    return f"Session date: {when or 'unknown'}"


def _state(state: str) -> str:
    return f"Current memory state:\n{state.strip() or '(empty)'}"


def _entry(entry: MemoryEntry, max_chars: int) -> str:
    text = entry.text if len(entry.text) <= max_chars else entry.text[:max_chars] + " [...]"
    when = format_date(entry.event_time, with_time=False) if entry.event_time else "date unknown"
    return f"  - [{entry.id} | {when}] {text}"


def render_splitter(session: Session, state: str, query: str | None = None, *,
                    max_transcript_chars: int = DEFAULT_MAX_TRANSCRIPT_CHARS) -> RenderedPrompt:
    """Mode `operations`, splitter: new text + current query (+ the state, to tell what is new)."""
    transcript, omitted, _ = fit_transcript(session.messages, max_transcript_chars)
    user = "\n\n".join([_state(state), f"Current query: {query.strip() if query else '(none)'}", _date(session),
                        "New conversation text:\n" + (transcript or "(no turns)")])
    return RenderedPrompt("operations", "splitter",
                          [{"role": "system", "content": _SPLITTER.format(schema=_schema_text(SPLITTER_SCHEMA))},
                           {"role": "user", "content": user}], omitted)


def render_long_term(facts: Sequence[str], candidates: Sequence[Sequence[MemoryEntry]], session: Session, *,
                     max_entry_chars: int = DEFAULT_MAX_ENTRY_CHARS) -> RenderedPrompt:
    """Mode `operations`, long-term agent: each important fact with its retrieved memories."""
    if len(facts) != len(candidates):
        raise ValueError(f"{len(facts)} facts but {len(candidates)} candidate lists")
    blocks = []
    for i, (fact, shown) in enumerate(zip(facts, candidates)):
        lines = [_entry(e, max_entry_chars) for e in shown] or ["  (no stored memory is similar)"]
        blocks.append(f"Fact {i}: {fact}\n  Similar stored memories:\n" + "\n".join(lines))
    user = _date(session) + "\n\n" + "\n\n".join(blocks)
    return RenderedPrompt("operations", "long_term",
                          [{"role": "system", "content": _LONG_TERM.format(schema=_schema_text(LONG_TERM_SCHEMA))},
                           {"role": "user", "content": user}])


def render_short_term(state: str, facts: Sequence[str], session: Session, *, state_limit: int) -> RenderedPrompt:
    """Mode `operations`, short-term agent: previous state + the unimportant facts."""
    new = "\n".join(f"- {f}" for f in facts) or "(none)"
    user = "\n\n".join([_state(state), _date(session), "New minor facts:\n" + new])
    system = _SHORT_TERM.format(limit=state_limit, schema=_schema_text(short_term_schema(state_limit)))
    return RenderedPrompt("operations", "short_term",
                          [{"role": "system", "content": system}, {"role": "user", "content": user}])


def render_consolidation(state: str, *, state_limit: int, target_chars: int | None = None) -> RenderedPrompt:
    """Mode `consolidation`: rewrite an over-long state under the limit (default target 80% of it)."""
    target = target_chars or max(1, int(state_limit * 0.8))
    system = _CONSOLIDATE.format(length=len(state), limit=state_limit, target=target,
                                 schema=_schema_text(short_term_schema(state_limit)))
    return RenderedPrompt("consolidation", "short_term",
                          [{"role": "system", "content": system},
                           {"role": "user", "content": "State to rewrite:\n" + state}])


def render_chat(query: str, state: str, memories: Sequence[MemoryEntry], current_date: str | None = None, *,
                max_entry_chars: int = DEFAULT_MAX_ENTRY_CHARS) -> RenderedPrompt:
    """Mode `chat`: the answer agent's prompt (memories given oldest first by the caller)."""
    lines = [_entry(e, max_entry_chars)[2:] for e in memories]
    parts = [f"Short-term memory state:\n{state.strip() or '(empty)'}",
             "Long-term memories (oldest first):\n" + ("\n".join(lines) if lines else "(none)")]
    if current_date:
        parts.append(f"Current date: {current_date}")
    parts.append(f"Question: {query}\nAnswer:")
    return RenderedPrompt("chat", "answer", [{"role": "system", "content": _CHAT},
                                             {"role": "user", "content": "\n\n".join(parts)}])


def render(mode: str, **kwargs) -> RenderedPrompt:
    """One entry point for the three modes: `operations` takes `role` plus that role's arguments."""
    if mode == "chat":
        return render_chat(**kwargs)
    if mode == "consolidation":
        return render_consolidation(**kwargs)
    if mode == "operations":
        role = kwargs.pop("role", None)
        fn = {"splitter": render_splitter, "long_term": render_long_term, "short_term": render_short_term}.get(role)
        if fn is None:
            raise ValueError(f"operations mode needs role= splitter | long_term | short_term, got {role!r}")
        return fn(**kwargs)
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
