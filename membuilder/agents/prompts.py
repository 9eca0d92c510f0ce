"""Prompt renderers of the four memory agents (our own wording; DESIGN section 2).

Each agent gets a system message (its role, the rules, the allowed actions and the exact JSON
schema of the answer) and a user message (session date, speakers, the agent's current memory,
the session transcript). The core agent sees the whole core block and its length against the
limit; the others see the top-k entries of their OWN kind with ids, from a kind-filtered search
whose query is built from the session and bounded (`session_query`; REFERENCE item 2). When the
bank holds at most k entries of the kind, all of them are shown.

Size: the sum of the message contents never exceeds `max_prompt_chars`. Characters, not tokens,
because the renderer does not know the model's tokenizer: for a model with a context of C tokens
answering in at most M tokens, use `chars_for_tokens(C, M)`, which allows 3 characters per token
(English text averages about 4 with current BPE tokenizers, so this leaves a margin; text in
scripts that tokenize densely, e.g. Chinese, needs a smaller `chars_per_token`). When the session
does not fit: (1) turns longer than `max_turn_chars` are shortened, with a marker saying how much
was left out; (2) if it still does not fit, whole turns are kept from the start and the rest is
replaced by a marker that names the left-out turn ids. The shown entries are limited to a share of
the budget (the least relevant go first); each is cut at `max_entry_chars` with a marker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from membuilder.bank import MAX_QUERY_CHARS, MemoryBank
from membuilder.datasets import Message, Session
from membuilder.types import CORE_LIMIT, InvalidInputError, MemoryEntry, MemoryKind

from .schema import agent_schema, compression_schema

DEFAULT_TOP_K = 20
DEFAULT_MAX_PROMPT_CHARS = 24000
DEFAULT_MAX_TURN_CHARS = 2000
DEFAULT_MAX_ENTRY_CHARS = 1000
ENTRY_SHARE = 0.4  # at most this share of what is left after the fixed text goes to shown entries
MIN_TRANSCRIPT_CHARS = 400  # below this a prompt cannot carry a session meaningfully
AGENT_KINDS: tuple[MemoryKind, ...] = (
    MemoryKind.CORE, MemoryKind.EPISODIC, MemoryKind.SEMANTIC, MemoryKind.PROCEDURAL)


class PromptBudgetError(InvalidInputError):
    """`max_prompt_chars` is too small for the fixed parts of a prompt."""


def chars_for_tokens(context_tokens: int, max_new_tokens: int, *, chars_per_token: float = 3.0,
                     template_tokens: int = 64) -> int:
    """A `max_prompt_chars` for a model with `context_tokens` of context answering in at most
    `max_new_tokens` (`template_tokens` cover the chat template's own tokens)."""
    room = context_tokens - max_new_tokens - template_tokens
    if room <= 0:
        raise InvalidInputError(f"a context of {context_tokens} tokens leaves no room for a prompt "
                                f"after {max_new_tokens} new tokens and {template_tokens} template tokens")
    return int(room * chars_per_token)


# --- what the agent sees from the bank --------------------------------------------------------------


def session_query(session: Session, max_chars: int = MAX_QUERY_CHARS) -> str:
    """A search query for `session`, at most `max_chars` characters, covering the whole session.

    Short sessions give all their turns' text. Longer ones give the start of every turn (an equal
    share each), or, when there are too many turns for a useful share, the start of evenly spaced
    turns: the query represents the whole session, not only its beginning.
    """
    if max_chars <= 0:
        raise InvalidInputError(f"max_chars must be positive, got {max_chars}")
    texts = [" ".join(m.text.split()) for m in session.messages]
    texts = [t for t in texts if t]
    joined = "\n".join(texts)
    if len(joined) <= max_chars:
        return joined
    min_share = 60
    if max_chars // len(texts) < min_share:
        count = max(1, max_chars // min_share)
        picks = np.linspace(0, len(texts) - 1, count).round().astype(int)
        texts = [texts[i] for i in dict.fromkeys(picks.tolist())]
    share = max_chars // len(texts) - 1
    return "\n".join(_clip_words(t, share) for t in texts)[:max_chars]


def _clip_words(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ")
    return cut[:space] if space > limit // 2 else cut


def select_entries(bank: MemoryBank, kind: MemoryKind | str, query: str, top_k: int = DEFAULT_TOP_K, *,
                   query_embedding: np.ndarray | None = None) -> tuple[list[MemoryEntry], int]:
    """The entries of `kind` an agent is shown, most relevant first, and the kind's total count.

    A kind-filtered search (so the agent sees up to `top_k` entries of its own kind, not what is
    left of a mixed top-k; REFERENCE item 2). When the search returns fewer than `top_k` (BM25
    without embeddings leaves out entries sharing no word with the query), the most recently
    updated other entries fill the list: with at most `top_k` entries of the kind, all are shown.
    """
    kind = MemoryKind.parse(kind)
    if kind is MemoryKind.CORE:
        raise InvalidInputError("core memory has no entries; render the core block instead")
    if not isinstance(top_k, int) or top_k <= 0:
        raise InvalidInputError(f"top_k must be a positive integer, got {top_k!r}")
    everything = bank.entries(kind)
    if not everything:
        return [], 0
    shown: list[MemoryEntry] = []
    if query.strip():
        hits = bank.search(query, k=top_k, kinds=kind, query_embedding=query_embedding)
        shown = [h.entry for h in hits]
    if len(shown) < top_k:
        have = {e.id for e in shown}
        rest = sorted((e for e in everything if e.id not in have), key=lambda e: (-e.updated_at, e.id))
        shown += rest[: top_k - len(shown)]
    return shown, len(everything)


def speakers_of(session: Session) -> tuple[str, ...]:
    """Speaker names in order of first appearance."""
    return tuple(dict.fromkeys(m.speaker for m in session.messages))


# --- the rendered prompt --------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderedPrompt:
    """One agent's prompt and what went into it."""

    kind: MemoryKind
    messages: list[dict]
    entries: tuple[MemoryEntry, ...]  # shown in the prompt, in order (empty for core)
    total_entries: int  # active entries of this kind in the bank
    omitted_turns: tuple[str, ...] = ()  # turn ids left out for lack of room
    shortened_turns: tuple[str, ...] = ()  # turn ids shown shortened

    @property
    def chars(self) -> int:
        return sum(len(m["content"]) for m in self.messages)


_COMMON_RULES = """Rules:
- Use only what the session says. Do not invent, guess or add advice of your own.
- Write each memory as a self-contained statement that names whom it is about (names, never "I", "you", "he" or "she"), so that it can be understood without the conversation.
- Turn relative times ("yesterday", "last week", "next month") into absolute dates, using the session date.
- Entry ids refer to the entries listed in the user message; use only those ids, exactly as written.
- If the session gives nothing for this memory, answer {"operations": []}.
- Answer with the JSON object only: no explanation, no Markdown."""

_ROLE = {
    MemoryKind.CORE: """You maintain the CORE memory of a long-term memory built from conversations.
The core memory is one short text block that is shown in full every time a question is answered from this memory. It holds the lasting essentials about the people in the conversation: identity (name, age, gender, home, work, background), stable preferences and values, and important relationships. It does not hold one-off events or details: other memories keep those.
The block has a hard limit of {limit} characters and now has {length}. A change that would make it longer than the limit is refused, so keep it compact.

Actions (answer with exactly one operation object, or {{"operations": []}} for no change):
- APPEND new lines at the end: {{"action": "APPEND", "content": "..."}}
- REPLACE a passage: {{"action": "REPLACE", "old_text": "<copied exactly from the block>", "new_text": "..."}}. old_text must occur in the block exactly as written; an empty new_text deletes the passage. Use it when the session changes or corrects something the block says.
- REWRITE the whole block: {{"action": "REWRITE", "content": "..."}}. Only to reorganise or shorten it; keep everything that is still true.""",
    MemoryKind.EPISODIC: """You maintain the EPISODIC memory of a long-term memory built from conversations.
The episodic memory is a list of events, one event per entry, each with the date when it happened or is planned: a trip, a meeting, an achievement, a purchase, an illness, a decision, a plan for a date.

Actions (answer {{"operations": [...]}} with any number of them):
- ADD a new event: {{"action": "ADD", "memory": "...", "time": "YYYY-MM-DD"}}
- UPDATE a listed event that the session corrects or completes: {{"action": "UPDATE", "id": "E12", "new_memory": "<the full new text>", "time": "YYYY-MM-DD"}}
- MERGE two or more listed entries that describe the same event: {{"action": "MERGE", "ids": ["E3", "E9"], "new_memory": "...", "time": "YYYY-MM-DD"}}
Give "time" whenever the date can be worked out and leave it out otherwise; something that happens during the session has the session date.""",
    MemoryKind.SEMANTIC: """You maintain the SEMANTIC memory of a long-term memory built from conversations.
The semantic memory holds lasting knowledge about people, places, things and ideas, one fact per entry: what someone is like, owns, knows, likes or believes, who is related to whom, facts about places and things. Dated one-off events belong to the episodic memory and routines to the procedural memory, not here.

Actions (answer {{"operations": [...]}} with any number of them):
- ADD a new fact: {{"action": "ADD", "memory": "..."}}
- UPDATE a listed fact that the session changes or refines: {{"action": "UPDATE", "id": "S4", "new_memory": "<the full new text>"}}
- SKIP a fact that a listed entry already holds: {{"action": "SKIP", "reason": "already stored as S4"}}""",
    MemoryKind.PROCEDURAL: """You maintain the PROCEDURAL memory of a long-term memory built from conversations.
The procedural memory holds how people do things, one procedure per entry: routines, habits, recipes, workflows, methods and instructions, with the steps in order when the session gives them.

Actions (answer {{"operations": [...]}} with any number of them):
- ADD a new procedure: {{"action": "ADD", "memory": "..."}}
- UPDATE a listed procedure that the session changes or extends: {{"action": "UPDATE", "id": "P2", "new_memory": "<the full new text>"}}
Most sessions describe no procedure; then answer {{"operations": []}}.""",
}


def system_prompt(kind: MemoryKind | str, *, core_length: int = 0, core_limit: int = CORE_LIMIT) -> str:
    """The system message of one agent: role, rules, actions and the answer's JSON schema."""
    kind = MemoryKind.parse(kind)
    role = _ROLE[kind].format(limit=core_limit, length=core_length)
    schema = json.dumps(agent_schema(kind), separators=(",", ":"))
    return f"{role}\n\n{_COMMON_RULES}\n\nThe answer is one JSON object matching this JSON schema:\n{schema}"


def _date_line(session: Session) -> str:
    if session.date is None:
        return "Session date: unknown" + (f' (given as "{session.date_text}")' if session.date_text else "")
    d = session.date
    when = d.strftime("%Y-%m-%d (%A)") + (d.strftime(" %H:%M") if (d.hour, d.minute) != (0, 0) else "")
    source = f' [given as "{session.date_text}"]' if session.date_text else ""
    return f"Session date: {when}{source}"


def _subject_line(speakers: Sequence[str]) -> str:
    if set(speakers) == {"user", "assistant"}:
        return ("Speakers: user, assistant. The memory is about the user, who talks with an AI assistant; "
                'refer to them as "the user".')
    return f"Speakers: {', '.join(speakers)}. The memory is about these people."


def _entry_line(entry: MemoryEntry, max_chars: int) -> str:
    text = " ".join(entry.text.split())
    if len(text) > max_chars:
        text = f"{_clip_words(text, max_chars)} [... {len(text) - len(_clip_words(text, max_chars))} more characters]"
    when = f" ({entry.event_time})" if entry.event_time else ""
    return f"[{entry.id}]{when} {text}"


def _turn_line(m: Message) -> str:
    return f"[{m.turn_id}] {m.speaker}: {m.text}"


def _shorten_turn(line: str, limit: int) -> str:
    kept = _clip_words(line, limit)
    return f"{kept} [... {len(line) - len(kept)} more characters of this turn left out]"


def fit_transcript(messages: Sequence[Message], budget: int, *, max_turn_chars: int = DEFAULT_MAX_TURN_CHARS
                   ) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """The transcript in at most `budget` characters: (text, omitted turn ids, shortened turn ids)."""
    lines = [_turn_line(m) for m in messages]
    ids = [m.turn_id for m in messages]
    if len("\n".join(lines)) <= budget:
        return "\n".join(lines), (), ()
    shortened = tuple(i for i, line in zip(ids, lines) if len(line) > max_turn_chars)
    lines = [_shorten_turn(line, max_turn_chars) if len(line) > max_turn_chars else line for line in lines]
    if len("\n".join(lines)) <= budget:
        return "\n".join(lines), (), shortened

    def marker(n: int) -> str:
        return (f"[... {len(lines) - n} later turns ({ids[n]} to {ids[-1]}) are left out: the session is "
                "longer than this prompt allows ...]")

    best = None  # the most whole turns that fit with the marker; at least one turn is left out here
    prefix = 0  # characters of lines[:n], each followed by its newline
    for n in range(len(lines)):
        if prefix + len(marker(n)) <= budget:
            best = n
        elif prefix > budget:
            break
        prefix += len(lines[n]) + 1
    if best is None:
        raise PromptBudgetError(f"{budget} characters cannot hold even the omission marker of this session")
    n = best
    text = "\n".join(lines[:n] + [marker(n)])
    kept = set(ids[:n])
    return text, tuple(ids[n:]), tuple(i for i in shortened if i in kept)


def render_prompt(kind: MemoryKind | str, session: Session, *, core: str = "",
                  entries: Sequence[MemoryEntry] = (), total_entries: int | None = None,
                  speakers: Sequence[str] | None = None, core_limit: int = CORE_LIMIT,
                  max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS,
                  max_turn_chars: int = DEFAULT_MAX_TURN_CHARS,
                  max_entry_chars: int = DEFAULT_MAX_ENTRY_CHARS) -> RenderedPrompt:
    """Render one agent's prompt (see the module doc). `entries` must be of `kind`, most relevant first."""
    kind = MemoryKind.parse(kind)
    if any(e.kind is not kind for e in entries):
        raise InvalidInputError(f"the {kind.value} agent is shown only {kind.value} entries")
    if kind is MemoryKind.CORE and entries:
        raise InvalidInputError("the core agent is shown the core block, not entries")
    speakers = tuple(speakers) if speakers else speakers_of(session)
    system = system_prompt(kind, core_length=len(core), core_limit=core_limit)
    head = f"{_date_line(session)}\n{_subject_line(speakers)}\n\n"
    if kind is MemoryKind.CORE:
        memory = (f"Current core memory ({len(core)} of {core_limit} characters):\n<core>\n{core}\n</core>"
                  if core else f"Current core memory (0 of {core_limit} characters): empty")
    else:
        memory = ""  # filled below, once the room for entries is known
    title = f"New session ({len(session.messages)} turns):\n"
    tail = "\n\nAnswer with one JSON object."
    fixed = len(system) + len(head) + len(memory) + len(title) + len(tail) + 2
    room = max_prompt_chars - fixed
    if room < MIN_TRANSCRIPT_CHARS:
        raise PromptBudgetError(
            f"max_prompt_chars={max_prompt_chars} is too small for the {kind.value} prompt: its fixed "
            f"parts take {fixed} characters and the session needs at least {MIN_TRANSCRIPT_CHARS}")
    shown: list[MemoryEntry] = []
    if kind is not MemoryKind.CORE:
        total = len(entries) if total_entries is None else total_entries
        lines = []
        entry_room = int(room * ENTRY_SHARE) - 200  # the heading's own characters
        for e in entries:
            line = _entry_line(e, max_entry_chars)
            if sum(len(x) + 1 for x in lines) + len(line) > entry_room:
                break
            lines.append(line)
            shown.append(e)
        if not total:
            memory = f"Existing {kind.value} memory: empty"
        else:
            memory = (f"Existing {kind.value} memory: the {len(shown)} entries most related to this session, "
                      f"out of {total} (only these ids may be used):\n" + "\n".join(lines))
        room -= len(memory)
    transcript, omitted, shortened = fit_transcript(session.messages, room, max_turn_chars=max_turn_chars)
    user = f"{head}{memory}\n\n{title}{transcript}{tail}"
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    total = 0 if kind is MemoryKind.CORE else (len(entries) if total_entries is None else total_entries)
    rendered = RenderedPrompt(kind, messages, tuple(shown), total, omitted, shortened)
    if rendered.chars > max_prompt_chars:  # the arithmetic above guarantees this; fail loudly if not
        raise RuntimeError(f"rendered {kind.value} prompt has {rendered.chars} characters, over {max_prompt_chars}")
    return rendered


def render_session_prompts(bank: MemoryBank, session: Session, *, top_k: int = DEFAULT_TOP_K,
                           speakers: Sequence[str] | None = None,
                           max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS,
                           max_turn_chars: int = DEFAULT_MAX_TURN_CHARS,
                           max_entry_chars: int = DEFAULT_MAX_ENTRY_CHARS) -> dict[MemoryKind, RenderedPrompt]:
    """The four agents' prompts for `session` from the bank's current state."""
    query = session_query(session)
    embedding = None
    if bank.embedder is not None and query.strip():
        embedding = np.asarray(bank.embedder.embed([query]), dtype=np.float32)[0]  # [dim], once for 3 searches
    out = {}
    for kind in AGENT_KINDS:
        entries, total = ([], 0) if kind is MemoryKind.CORE else select_entries(
            bank, kind, query, top_k, query_embedding=embedding)
        out[kind] = render_prompt(kind, session, core=bank.core if kind is MemoryKind.CORE else "",
                                  entries=entries, total_entries=total, speakers=speakers,
                                  core_limit=bank.core_limit, max_prompt_chars=max_prompt_chars,
                                  max_turn_chars=max_turn_chars, max_entry_chars=max_entry_chars)
    return out


_COMPRESSION_SYSTEM = """You keep the CORE memory of a long-term memory built from conversations: one text block about the people in the conversation (identity, stable preferences, important relationships), shown in full every time a question is answered. It has a hard limit of {limit} characters.
A change has made the block {length} characters long, which is over the limit. Rewrite the whole block in at most {target} characters: keep every fact that matters about who the people are, what they prefer and whom they are related to; merge repetitions; drop minor details and wordy phrasing. Do not add anything that the block does not say.

Answer with the JSON object only, matching this JSON schema:
{schema}"""


def render_compression_prompt(proposed: str, *, core_limit: int = CORE_LIMIT, target_chars: int | None = None,
                              max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS) -> list[dict]:
    """The prompt of the core compression step: rewrite `proposed` (over the limit) as one REWRITE."""
    target = int(core_limit * 0.8) if target_chars is None else target_chars
    if not 0 < target <= core_limit:
        raise InvalidInputError(f"target_chars must be in (0, {core_limit}], got {target}")
    system = _COMPRESSION_SYSTEM.format(limit=core_limit, length=len(proposed), target=target,
                                        schema=json.dumps(compression_schema(core_limit), separators=(",", ":")))
    frame = 'The block to rewrite:\n<core>\n{}\n</core>\n\nAnswer with {{"action": "REWRITE", "content": "..."}}.'
    room = max_prompt_chars - len(system) - len(frame.format(""))
    if room < MIN_TRANSCRIPT_CHARS:
        raise PromptBudgetError(f"max_prompt_chars={max_prompt_chars} is too small for the compression prompt")
    shown = proposed
    if len(shown) > room:
        marker = f"\n[... {len(proposed)} characters in all; the rest is left out for lack of room]"
        shown = proposed[: room - len(marker)] + marker
    return [{"role": "system", "content": system}, {"role": "user", "content": frame.format(shown)}]
