"""The prepared conversations as JSONL: what the sparse ablation's trainer rolls out session by session.

The RL set (`rl_rows`) holds rendered prompts, not session text; the on-policy sparse ablation
(`trainers/conversation_episodes.py`) renders each session's prompts from its own memory, so it
needs the sessions themselves. `trainers/prepare_data.py` writes `DIR/conversations.jsonl`:

    line 1   {"format": "membuilder.conversations", "version": 1, "render": {...}, "embedder": ...}
    then     one `membuilder.datasets.Conversation` per line (`conversation_to_dict`)

`render` holds the keyword arguments the expert's prompts were rendered with
(`membuilder.agents.prompts.render_session_prompts`: top_k and the size limits) and `embedder`
the embedder of the expert's bank (which entries the prompts show), so a trajectory's prompts are
rendered exactly as the RL rows' were. Every field of a `Conversation` round-trips (datetimes as
ISO text, tuples as lists).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping

from membuilder.datasets import (
    CharacterMemory,
    Conversation,
    Event,
    LifeEvent,
    Message,
    Observation,
    Question,
    Relation,
    Session,
    SessionAnnotation,
)

FORMAT = "membuilder.conversations"
VERSION = 1
FILENAME = "conversations.jsonl"
RENDER_KEYS = ("top_k", "max_prompt_chars", "max_turn_chars", "max_entry_chars")


class ConversationFileError(ValueError):
    """A malformed conversations file; the message names the file, the line and the field."""


def _date(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _parse_date(value: Any, where: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConversationFileError(f"{where} must be an ISO date string or null, got {type(value).__name__}")
    try:
        return datetime.fromisoformat(value)
    except ValueError as exc:
        raise ConversationFileError(f"{where}: {exc}") from None


def conversation_to_dict(conv: Conversation) -> dict:
    """A JSON-ready dict holding every field of `conv` (`conversation_from_dict` inverts it)."""

    def message(m: Message) -> dict:
        return {"speaker": m.speaker, "role": m.role, "text": m.text, "turn_id": m.turn_id,
                "image_caption": m.image_caption, "has_answer": m.has_answer}

    def session(s: Session) -> dict:
        return {"session_id": s.session_id, "date": _date(s.date), "date_text": s.date_text,
                "messages": [message(m) for m in s.messages], "source_id": s.source_id}

    def question(q: Question) -> dict:
        return {"question_id": q.question_id, "question": q.question, "answer": q.answer, "category": q.category,
                "evidence": list(q.evidence), "question_date": _date(q.question_date),
                "is_abstention": q.is_abstention, "adversarial_answer": q.adversarial_answer,
                "evidence_sessions": list(q.evidence_sessions), "question_date_text": q.question_date_text}

    def annotation(a: SessionAnnotation) -> dict:
        return {"session_id": a.session_id, "date": _date(a.date), "date_text": a.date_text,
                "observations": [{"speaker": o.speaker, "text": o.text, "turn_ids": list(o.turn_ids)}
                                 for o in a.observations],
                "events": [{"speaker": e.speaker, "text": e.text} for e in a.events], "summary": a.summary}

    def background(b: CharacterMemory | None) -> dict | None:
        if b is None:
            return None
        return {"name": b.name, "profile": dict(b.profile), "description": b.description,
                "relations": [{"relation_id": r.relation_id, "name": r.name, "relationship": r.relationship,
                               "description": r.description} for r in b.relations],
                "events": [{"event_id": e.event_id, "summary": e.summary, "content": e.content,
                            "relation_ids": list(e.relation_ids), "date": _date(e.date), "date_text": e.date_text,
                            "theme": e.theme} for e in b.events]}

    return {"conversation_id": conv.conversation_id, "speakers": list(conv.speakers),
            "sessions": [session(s) for s in conv.sessions], "questions": [question(q) for q in conv.questions],
            "annotations": [annotation(a) for a in conv.annotations], "dataset": conv.dataset,
            "background": background(conv.background)}


def conversation_from_dict(d: Mapping[str, Any], where: str = "conversation") -> Conversation:
    """The `Conversation` a `conversation_to_dict` dict describes; `ConversationFileError` names a bad field."""

    def get(obj: Any, key: str, types, at: str, default: Any = ...) -> Any:
        if not isinstance(obj, Mapping):
            raise ConversationFileError(f"{at} must be an object, got {type(obj).__name__}")
        if key not in obj:
            if default is ...:
                raise ConversationFileError(f"{at}.{key} is missing")
            return default
        value = obj[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
            raise ConversationFileError(f"{at}.{key} has the wrong type {type(value).__name__}")
        return value

    def opt_str(obj, key, at):
        return get(obj, key, (str, type(None)), at, None)

    def strs(obj, key, at) -> tuple[str, ...]:
        items = get(obj, key, list, at, [])
        if not all(isinstance(x, str) for x in items):
            raise ConversationFileError(f"{at}.{key} must be a list of strings")
        return tuple(items)

    def message(m, at) -> Message:
        return Message(speaker=get(m, "speaker", str, at), role=get(m, "role", str, at), text=get(m, "text", str, at),
                       turn_id=get(m, "turn_id", str, at), image_caption=opt_str(m, "image_caption", at),
                       has_answer=get(m, "has_answer", (bool, type(None)), at, None))

    def session(s, at) -> Session:
        return Session(session_id=get(s, "session_id", str, at), date=_parse_date(s.get("date"), f"{at}.date"),
                       date_text=opt_str(s, "date_text", at),
                       messages=tuple(message(m, f"{at}.messages[{i}]")
                                      for i, m in enumerate(get(s, "messages", list, at))),
                       source_id=opt_str(s, "source_id", at))

    def question(q, at) -> Question:
        return Question(question_id=get(q, "question_id", str, at), question=get(q, "question", str, at),
                        answer=get(q, "answer", str, at), category=get(q, "category", str, at),
                        evidence=strs(q, "evidence", at),
                        question_date=_parse_date(q.get("question_date"), f"{at}.question_date"),
                        is_abstention=get(q, "is_abstention", bool, at),
                        adversarial_answer=opt_str(q, "adversarial_answer", at),
                        evidence_sessions=strs(q, "evidence_sessions", at),
                        question_date_text=opt_str(q, "question_date_text", at))

    def annotation(a, at) -> SessionAnnotation:
        return SessionAnnotation(
            session_id=get(a, "session_id", str, at), date=_parse_date(a.get("date"), f"{at}.date"),
            date_text=opt_str(a, "date_text", at),
            observations=tuple(Observation(get(o, "speaker", str, at), get(o, "text", str, at),
                                           strs(o, "turn_ids", at)) for o in get(a, "observations", list, at, [])),
            events=tuple(Event(get(e, "speaker", str, at), get(e, "text", str, at))
                         for e in get(a, "events", list, at, [])),
            summary=opt_str(a, "summary", at))

    def background(b, at) -> CharacterMemory | None:
        if b is None:
            return None
        profile = get(b, "profile", dict, at, {})
        return CharacterMemory(
            name=get(b, "name", str, at), profile=dict(profile), description=get(b, "description", str, at),
            relations=tuple(Relation(get(r, "relation_id", str, at), get(r, "name", str, at),
                                     get(r, "relationship", str, at), get(r, "description", str, at))
                            for r in get(b, "relations", list, at, [])),
            events=tuple(LifeEvent(get(e, "event_id", str, at), get(e, "summary", str, at), get(e, "content", str, at),
                                   strs(e, "relation_ids", at), _parse_date(e.get("date"), f"{at}.date"),
                                   get(e, "date_text", str, at), get(e, "theme", str, at))
                         for e in get(b, "events", list, at, [])))

    return Conversation(
        conversation_id=get(d, "conversation_id", str, where), speakers=strs(d, "speakers", where),
        sessions=tuple(session(s, f"{where}.sessions[{i}]") for i, s in enumerate(get(d, "sessions", list, where))),
        questions=tuple(question(q, f"{where}.questions[{i}]")
                        for i, q in enumerate(get(d, "questions", list, where, []))),
        annotations=tuple(annotation(a, f"{where}.annotations[{i}]")
                          for i, a in enumerate(get(d, "annotations", list, where, []))),
        dataset=get(d, "dataset", str, where, ""),
        background=background(d.get("background"), f"{where}.background"))


def _tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


@dataclass(frozen=True)
class ConversationFile:
    conversations: tuple[Conversation, ...]
    render: dict = field(default_factory=dict)  # render_session_prompts keyword arguments
    embedder: str = "hashing"  # the expert bank's embedder ("none": BM25 only)

    def by_id(self) -> dict[str, Conversation]:
        return {c.conversation_id: c for c in self.conversations}


def write_conversations(path: str | Path, conversations: Iterable[Conversation], *, render: Mapping[str, int],
                        embedder: str) -> Path:
    """Write the file (atomically: a temporary file renamed into place)."""
    path = Path(path)
    unknown = sorted(set(render) - set(RENDER_KEYS))
    if unknown:
        raise ValueError(f"unknown render settings {unknown}; known: {list(RENDER_KEYS)}")
    conversations = list(conversations)
    ids = [c.conversation_id for c in conversations]
    if len(set(ids)) != len(ids):
        raise ValueError("conversation ids must be unique in a conversations file")
    header = {"format": FORMAT, "version": VERSION, "render": dict(render), "embedder": embedder}
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(header, ensure_ascii=False) + "\n")
        for conv in conversations:
            fh.write(json.dumps(conversation_to_dict(conv), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def read_conversations(path: str | Path) -> ConversationFile:
    """Read and validate a conversations file; errors name the file, the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise ConversationFileError(f"conversations file not found: {path} (prepare the data again with "
                                    "trainers/prepare_data.py: it writes it beside rl.parquet)")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    try:
        rows = [json.loads(line) for line in lines]
    except json.JSONDecodeError as exc:
        raise ConversationFileError(f"{path}: not JSON lines ({exc})") from None
    if not rows or not isinstance(rows[0], dict) or rows[0].get("format") != FORMAT:
        raise ConversationFileError(f"{path}: the first line must be a {FORMAT!r} header")
    header = rows[0]
    if header.get("version") != VERSION:
        raise ConversationFileError(f"{path}: version {header.get('version')!r}, this reader knows {VERSION}")
    render = header.get("render") or {}
    if not isinstance(render, dict) or set(render) - set(RENDER_KEYS) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in render.values()):
        raise ConversationFileError(f"{path}: header.render must map {list(RENDER_KEYS)} to integers >= 1")
    embedder = header.get("embedder", "hashing")
    if not isinstance(embedder, str):
        raise ConversationFileError(f"{path}: header.embedder must be a string")
    convs = tuple(conversation_from_dict(d, f"{path.name} line {i + 2}: conversation") for i, d in enumerate(rows[1:]))
    ids = [c.conversation_id for c in convs]
    if len(set(ids)) != len(ids):
        raise ConversationFileError(f"{path}: conversation ids repeat")
    return ConversationFile(convs, dict(render), embedder)
