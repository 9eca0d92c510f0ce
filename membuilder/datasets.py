"""LoCoMo, LongMemEval and PerLTQA loaded into one internal format, with validation.

Internal format: `Conversation -> Session -> Message`, plus `Question`s with evidence. All value
types are frozen dataclasses (sequences are tuples). Input that does not match the expected
format raises `DatasetFormatError` naming the file and the field, e.g.
"locomo10.json: sample 3 (conv-30): qa[12]: missing 'question'".

LoCoMo (snap-research/LoCoMo, `data/locomo10.json`):
- sessions are the `session_N` keys actually present (some samples carry extra `_date_time`
  keys), in numeric order; `session_id` is "session_N"; turn ids are the dataset's `dia_id`;
- `speaker_a` is role "user", `speaker_b` role "assistant", by the sample's own fields, never by
  set order (REFERENCE item 12); speaker names are kept;
- a shared image is kept as text: " [shares an image: <blip_caption>]" is appended to the turn,
  and the caption is also in `Message.image_caption`;
- categories by name: 1 multi-hop, 2 temporal, 3 open-domain, 4 single-hop, 5 adversarial.
  Category 5 (REFERENCE item 11) is flagged (`Question.is_adversarial`) so runners report it
  apart. Our choice for its gold answer: when the item has no `answer` (444 of 446), the answer is
  `NOT_ANSWERABLE` and `is_abstention` is True; the two items that do carry an answer ("No") keep
  it and are not abstentions. `adversarial_answer` (the planted wrong answer) is kept;
- integer answers become strings; evidence ids are normalised ("D8:6; D9:17" -> two ids,
  "D:11:26" -> "D11:26"); tokens without a session and turn number (one bare "D") are dropped;
- the per-session `observation`, `event_summary` and `session_summary` annotations are kept as
  `SessionAnnotation`s (facts with their turn ids, events with the session's event date).

LongMemEval (S, M, oracle; `.json` or `.json.gz`): one Conversation per question. Sessions are
ordered by date (stable), as LongMemEval's own reader sorts its history by date; the file order
is not chronological for some questions. A session id repeated inside one haystack (it happens
in S) gets "/2", "/3", ... appended, with `source_id` keeping the original. Turn ids are
"<session_id>_<k>" (k from 1), LongMemEval's own corpus-id convention; `has_answer` is kept
(False when absent). `_abs` questions are abstentions; `question_type` is the category;
`answer_session_ids` is the evidence.

PerLTQA: see `load_perltqa` for exactly what was verified.
"""

from __future__ import annotations

import ast
import gzip
import json
import os
import random
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from membuilder.types import MemBuilderError

NOT_ANSWERABLE = "Not answerable"
LOCOMO_CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
ADVERSARIAL = "adversarial"
LOCOMO_MAIN_CATEGORIES = ("multi-hop", "temporal", "open-domain", "single-hop")  # the usual 1,540
LONGMEMEVAL_ABS_SUFFIX = "_abs"
PERLTQA_SECTIONS = ("profile", "social_relationship", "events", "dialogues")


class DatasetFormatError(MemBuilderError, ValueError):
    """A dataset file does not match its format; the message names the file and the field."""


class SplitLeakageError(DatasetFormatError):
    """A base question id (x and x_abs) appears on more than one side of a split."""


# --- the internal format ------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    speaker: str
    role: str  # "user" or "assistant"
    text: str
    turn_id: str
    image_caption: str | None = None
    has_answer: bool | None = None  # LongMemEval's evidence-turn flag; None where not annotated


@dataclass(frozen=True)
class Session:
    session_id: str
    date: datetime | None
    date_text: str | None
    messages: tuple[Message, ...]
    source_id: str | None = None  # the id in the file when `session_id` had to differ from it


@dataclass(frozen=True)
class Question:
    question_id: str
    question: str
    answer: str
    category: str
    evidence: tuple[str, ...]  # as the dataset names it: turn ids (LoCoMo), session ids, memory ids
    question_date: datetime | None
    is_abstention: bool
    adversarial_answer: str | None = None
    evidence_sessions: tuple[str, ...] = ()  # ids of this conversation's sessions holding the evidence
    question_date_text: str | None = None

    @property
    def is_adversarial(self) -> bool:
        """LoCoMo category 5: reported apart from the main score."""
        return self.category == ADVERSARIAL

    @property
    def answerable(self) -> bool:
        return not self.is_abstention


@dataclass(frozen=True)
class Observation:
    speaker: str
    text: str
    turn_ids: tuple[str, ...]


@dataclass(frozen=True)
class Event:
    speaker: str
    text: str


@dataclass(frozen=True)
class SessionAnnotation:
    """LoCoMo's annotations of one session: facts (observation), events (event_summary)."""

    session_id: str
    date: datetime | None  # the event date of `event_summary` ("8 May, 2023")
    date_text: str | None
    observations: tuple[Observation, ...]
    events: tuple[Event, ...]
    summary: str | None = None


@dataclass(frozen=True)
class Relation:
    relation_id: str
    name: str
    relationship: str
    description: str


@dataclass(frozen=True)
class LifeEvent:
    event_id: str
    summary: str
    content: str
    relation_ids: tuple[str, ...]
    date: datetime | None  # parsed when "Creation Time" is a date; it may be free text
    date_text: str
    theme: str


@dataclass(frozen=True)
class CharacterMemory:
    """PerLTQA's semantic memory (profile, relations) and event narratives of one character."""

    name: str
    profile: Mapping[str, str]
    description: str
    relations: tuple[Relation, ...]
    events: tuple[LifeEvent, ...]


@dataclass(frozen=True)
class Conversation:
    conversation_id: str
    speakers: tuple[str, ...]
    sessions: tuple[Session, ...]
    questions: tuple[Question, ...]
    annotations: tuple[SessionAnnotation, ...] = ()
    dataset: str = ""
    background: CharacterMemory | None = None
    _by_id: dict = field(default=None, init=False, repr=False, compare=False)

    def session(self, session_id: str) -> Session:
        if self._by_id is None:
            object.__setattr__(self, "_by_id", {s.session_id: s for s in self.sessions})
        try:
            return self._by_id[session_id]
        except KeyError:
            raise KeyError(f"{self.conversation_id}: no session {session_id!r}") from None

    @property
    def num_turns(self) -> int:
        return sum(len(s.messages) for s in self.sessions)


# --- shared helpers -----------------------------------------------------------------------------


def _fail(where: str, what: str) -> DatasetFormatError:
    return DatasetFormatError(f"{where}: {what}")


def _get(obj: Any, key: str, types: type | tuple[type, ...], where: str, *, optional: bool = False) -> Any:
    if not isinstance(obj, dict):
        raise _fail(where, f"expected an object, got {type(obj).__name__}")
    if key not in obj:
        if optional:
            return None
        raise _fail(where, f"missing {key!r}")
    value = obj[key]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise _fail(where, f"{key!r} is a bool, expected {_type_names(types)}")
    if not isinstance(value, types):
        raise _fail(where, f"{key!r} is a {type(value).__name__}, expected {_type_names(types)}")
    return value


def _type_names(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
    opener = gzip.open if gzipped else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise DatasetFormatError(f"{path.name}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetFormatError(f"{path.name}: cannot be read as (gzipped) UTF-8 JSON: {exc}") from exc


_MONTHS = {name: i + 1 for i, name in enumerate(
    ["january", "february", "march", "april", "may", "june", "july", "august", "september",
     "october", "november", "december"])}
_MONTHS.update({name[:3]: num for name, num in list(_MONTHS.items())})
_MONTHS["sept"] = 9
_LOCOMO_DT = re.compile(r"(\d{1,2}):(\d{2})\s*([ap])\.?m\.?\s+on\s+(\d{1,2})\s+([A-Za-z]+),?\s+(\d{4})", re.I)
_DAY_MONTH_YEAR = re.compile(r"(\d{1,2})\s+([A-Za-z]+),?\s+(\d{4})")
_MONTH_DAY_YEAR = re.compile(r"([A-Za-z]+)\s+(\d{1,2}),?\s+(\d{4})")
_MONTH_YEAR = re.compile(r"([A-Za-z]+),?\s+(\d{4})")
_LME_DT = re.compile(r"(\d{4})/(\d{2})/(\d{2})\s*(?:\([A-Za-z]+\))?\s*(\d{1,2}):(\d{2})")


def _month(name: str) -> int | None:
    return _MONTHS.get(name.lower())


def parse_locomo_datetime(text: str) -> datetime | None:
    """'1:56 pm on 8 May, 2023' -> 2023-05-08 13:56; None when it does not match."""
    m = _LOCOMO_DT.fullmatch(text.strip())
    if not m or _month(m.group(5)) is None:
        return None
    hour, minute = int(m.group(1)) % 12, int(m.group(2))
    if m.group(3).lower() == "p":
        hour += 12
    try:
        return datetime(int(m.group(6)), _month(m.group(5)), int(m.group(4)), hour, minute)
    except ValueError:
        return None


def parse_loose_date(text: str) -> datetime | None:
    """'8 May, 2023', 'May 12, 2022', 'October 2021', '2012', '2022-05-12 10:00' -> datetime
    (missing day/month default to 1); None for free text such as 'during an election'."""
    s = text.strip()
    try:
        return datetime.fromisoformat(s)
    except ValueError:
        pass
    for pattern, order in ((_DAY_MONTH_YEAR, "dmy"), (_MONTH_DAY_YEAR, "mdy")):
        m = pattern.fullmatch(s)
        if m:
            parts = dict(zip(order, m.groups()))
            month = _month(parts["m"])
            if month is None:
                return None
            try:
                return datetime(int(parts["y"]), month, int(parts["d"]))
            except ValueError:
                return None
    m = _MONTH_YEAR.fullmatch(s)
    if m and _month(m.group(1)) is not None:
        return datetime(int(m.group(2)), _month(m.group(1)), 1)
    if re.fullmatch(r"\d{4}", s):
        return datetime(int(s), 1, 1)
    return None


def parse_longmemeval_datetime(text: str) -> datetime | None:
    """'2023/05/30 (Tue) 23:40' -> 2023-05-30 23:40; None when it does not match."""
    m = _LME_DT.fullmatch(text.strip())
    if not m:
        return None
    try:
        return datetime(*(int(g) for g in m.groups()))
    except ValueError:
        return None


_DIA_ID = re.compile(r"D:?(\d+):(\d+)")


def normalise_locomo_ids(value: Any, where: str) -> tuple[str, ...]:
    """Evidence / observation turn ids as clean "D<session>:<turn>" strings (see module doc)."""
    items = value if isinstance(value, list) else [value]
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise _fail(where, f"turn id {item!r} is not a string")
        for token in re.split(r"[\s,;]+", item.strip()):
            m = _DIA_ID.fullmatch(token)
            if m:
                out.append(f"D{int(m.group(1))}:{int(m.group(2))}")
    return tuple(dict.fromkeys(out))


# --- LoCoMo -------------------------------------------------------------------------------------


def load_locomo(path: str | os.PathLike) -> list[Conversation]:
    """Load the original `locomo10.json` (see the module docstring for the conventions)."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise _fail(path.name, f"expected a list of samples, got {type(data).__name__}")
    return [_locomo_sample(sample, i, path.name) for i, sample in enumerate(data)]


def _locomo_sample(sample: Any, index: int, fname: str) -> Conversation:
    sample_id = _get(sample, "sample_id", (str, int), f"{fname}: sample {index}")
    where = f"{fname}: sample {index} ({sample_id})"
    conv = _get(sample, "conversation", dict, where)
    cwhere = f"{where}: conversation"
    speaker_a = _get(conv, "speaker_a", str, cwhere)
    speaker_b = _get(conv, "speaker_b", str, cwhere)
    if speaker_a == speaker_b:
        raise _fail(cwhere, f"speaker_a and speaker_b are both {speaker_a!r}")
    roles = {speaker_a: "user", speaker_b: "assistant"}
    numbers = sorted(int(m.group(1)) for k in conv if (m := re.fullmatch(r"session_(\d+)", k)))
    if not numbers:
        raise _fail(cwhere, "no 'session_N' keys")
    sessions = [_locomo_session(conv, n, roles, cwhere) for n in numbers]
    turn_session = {m.turn_id: s.session_id for s in sessions for m in s.messages}

    qa = _get(sample, "qa", list, where)
    questions = [_locomo_question(item, f"{where}: qa[{i}]", f"{sample_id}/q{i}", turn_session)
                 for i, item in enumerate(qa)]
    annotations = _locomo_annotations(sample, numbers, where)
    return Conversation(conversation_id=str(sample_id), speakers=(speaker_a, speaker_b),
                        sessions=tuple(sessions), questions=tuple(questions),
                        annotations=annotations, dataset="locomo")


def _locomo_session(conv: dict, n: int, roles: dict[str, str], cwhere: str) -> Session:
    key = f"session_{n}"
    turns = _get(conv, key, list, cwhere)
    date_text = _get(conv, f"{key}_date_time", str, cwhere)
    date = parse_locomo_datetime(date_text)
    if date is None:
        raise _fail(cwhere, f"{key}_date_time {date_text!r} is not like '1:56 pm on 8 May, 2023'")
    messages = []
    for t, turn in enumerate(turns):
        twhere = f"{cwhere}: {key}[{t}]"
        speaker = _get(turn, "speaker", str, twhere)
        if speaker not in roles:
            raise _fail(twhere, f"speaker {speaker!r} is neither speaker_a nor speaker_b ({sorted(roles)})")
        dia_id = _get(turn, "dia_id", str, twhere)
        text = _get(turn, "text", str, twhere)
        caption = _get(turn, "blip_caption", str, twhere, optional=True)
        if caption:
            text = f"{text} [shares an image: {caption}]" if text else f"[shares an image: {caption}]"
        messages.append(Message(speaker=speaker, role=roles[speaker], text=text, turn_id=dia_id,
                                image_caption=caption or None))
    return Session(session_id=key, date=date, date_text=date_text, messages=tuple(messages))


def _locomo_question(item: Any, where: str, qid: str, turn_session: dict[str, str]) -> Question:
    question = _get(item, "question", str, where)
    cat = _get(item, "category", int, where)
    if cat not in LOCOMO_CATEGORIES:
        raise _fail(where, f"category {cat} is not one of {sorted(LOCOMO_CATEGORIES)}")
    evidence = normalise_locomo_ids(_get(item, "evidence", list, where), f"{where}: evidence")
    answer = _get(item, "answer", (str, int, float), where, optional=cat == 5)
    adversarial = _get(item, "adversarial_answer", (str, int, float), where, optional=True)
    sessions = tuple(dict.fromkeys(turn_session[e] for e in evidence if e in turn_session))
    return Question(
        question_id=qid, question=question,
        answer=NOT_ANSWERABLE if answer is None else str(answer),
        category=LOCOMO_CATEGORIES[cat], evidence=evidence, question_date=None,
        is_abstention=answer is None,
        adversarial_answer=None if adversarial is None else str(adversarial),
        evidence_sessions=sessions)


def _locomo_annotations(sample: dict, numbers: list[int], where: str) -> tuple[SessionAnnotation, ...]:
    observation = _get(sample, "observation", dict, where, optional=True) or {}
    events = _get(sample, "event_summary", dict, where, optional=True) or {}
    summaries = _get(sample, "session_summary", dict, where, optional=True) or {}
    out = []
    for n in numbers:
        obs_key, ev_key, sum_key = f"session_{n}_observation", f"events_session_{n}", f"session_{n}_summary"
        if obs_key not in observation and ev_key not in events and sum_key not in summaries:
            continue
        facts: list[Observation] = []
        obs = _get(observation, obs_key, dict, f"{where}: observation", optional=True) or {}
        for speaker, items in obs.items():
            owhere = f"{where}: observation.{obs_key}.{speaker}"
            if not isinstance(items, list):
                raise _fail(owhere, f"expected a list of [fact, turn ids], got {type(items).__name__}")
            for j, pair in enumerate(items):
                if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
                    raise _fail(f"{owhere}[{j}]", "expected [fact text, turn id(s)]")
                facts.append(Observation(speaker=speaker, text=pair[0],
                                         turn_ids=normalise_locomo_ids(pair[1], f"{owhere}[{j}]")))
        ev = _get(events, ev_key, dict, f"{where}: event_summary", optional=True) or {}
        date_text = ev.get("date")
        if date_text is not None and not isinstance(date_text, str):
            raise _fail(f"{where}: event_summary.{ev_key}", "'date' is not a string")
        happened: list[Event] = []
        for speaker, items in ev.items():
            if speaker == "date":
                continue
            ewhere = f"{where}: event_summary.{ev_key}.{speaker}"
            if not (isinstance(items, list) and all(isinstance(x, str) for x in items)):
                raise _fail(ewhere, "expected a list of event strings")
            happened.extend(Event(speaker=speaker, text=x) for x in items)
        summary = summaries.get(sum_key)
        out.append(SessionAnnotation(
            session_id=f"session_{n}", date=parse_loose_date(date_text) if date_text else None,
            date_text=date_text, observations=tuple(facts), events=tuple(happened),
            summary=summary if isinstance(summary, str) else None))
    return tuple(out)


# --- LongMemEval --------------------------------------------------------------------------------


def load_longmemeval(path: str | os.PathLike, *, chronological: bool = True) -> list[Conversation]:
    """Load LongMemEval S, M or oracle (`.json` or `.json.gz`): one Conversation per question.

    `chronological=False` keeps the file's haystack order instead of sorting sessions by date.
    """
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise _fail(path.name, f"expected a list of questions, got {type(data).__name__}")
    return [_longmemeval_item(item, f"{path.name}: item {i}", chronological) for i, item in enumerate(data)]


def _longmemeval_item(item: Any, where: str, chronological: bool) -> Conversation:
    qid = _get(item, "question_id", str, where)
    where = f"{where} ({qid})"
    qtype = _get(item, "question_type", str, where)
    question = _get(item, "question", str, where)
    answer = _get(item, "answer", (str, int, float), where)
    qdate_text = _get(item, "question_date", str, where)
    qdate = parse_longmemeval_datetime(qdate_text)
    if qdate is None:
        raise _fail(where, f"question_date {qdate_text!r} is not like '2023/05/30 (Tue) 23:40'")
    ids = _get(item, "haystack_session_ids", list, where)
    dates = _get(item, "haystack_dates", list, where)
    hay = _get(item, "haystack_sessions", list, where)
    if not len(ids) == len(dates) == len(hay):
        raise _fail(where, f"haystack_session_ids ({len(ids)}), haystack_dates ({len(dates)}) and "
                           f"haystack_sessions ({len(hay)}) differ in length")
    evidence = _get(item, "answer_session_ids", list, where)
    if not all(isinstance(e, str) for e in evidence):
        raise _fail(where, "answer_session_ids holds a non-string")

    seen: dict[str, int] = {}
    sessions = []
    for k, (sid, date_text, turns) in enumerate(zip(ids, dates, hay)):
        swhere = f"{where}: haystack_sessions[{k}]"
        if not isinstance(sid, str) or not isinstance(date_text, str):
            raise _fail(swhere, "session id and date must be strings")
        date = parse_longmemeval_datetime(date_text)
        if date is None:
            raise _fail(where, f"haystack_dates[{k}] {date_text!r} is not like '2023/05/30 (Tue) 23:40'")
        if not isinstance(turns, list):
            raise _fail(swhere, f"expected a list of turns, got {type(turns).__name__}")
        seen[sid] = seen.get(sid, 0) + 1
        session_id = sid if seen[sid] == 1 else f"{sid}/{seen[sid]}"
        messages = []
        for t, turn in enumerate(turns):
            twhere = f"{swhere}[{t}]"
            role = _get(turn, "role", str, twhere)
            if role not in ("user", "assistant"):
                raise _fail(twhere, f"role {role!r} is not 'user' or 'assistant'")
            content = _get(turn, "content", str, twhere)
            has_answer = _get(turn, "has_answer", bool, twhere, optional=True)
            messages.append(Message(speaker=role, role=role, text=content, turn_id=f"{session_id}_{t + 1}",
                                    has_answer=bool(has_answer)))
        sessions.append(Session(session_id=session_id, date=date, date_text=date_text,
                                messages=tuple(messages), source_id=sid if session_id != sid else None))
    if chronological:
        sessions.sort(key=lambda s: s.date)  # stable: ties keep the file order

    wanted = set(evidence)
    q = Question(
        question_id=qid, question=question, answer=str(answer), category=qtype, evidence=tuple(evidence),
        question_date=qdate, question_date_text=qdate_text,
        is_abstention=qid.endswith(LONGMEMEVAL_ABS_SUFFIX),
        evidence_sessions=tuple(s.session_id for s in sessions if (s.source_id or s.session_id) in wanted))
    return Conversation(conversation_id=qid, speakers=("user", "assistant"), sessions=tuple(sessions),
                        questions=(q,), dataset="longmemeval")


def longmemeval_base_id(question_id: str) -> str:
    """'x_abs' -> 'x': the abstention twin shares its base question's haystack."""
    return question_id[: -len(LONGMEMEVAL_ABS_SUFFIX)] if question_id.endswith(LONGMEMEVAL_ABS_SUFFIX) else question_id


def split_longmemeval_ids(ids: Iterable[str], fractions: Sequence[float] = (0.5, 0.5), *,
                          seed: int = 0) -> list[list[str]]:
    """Split question ids into len(fractions) sides, a base id and its `_abs` twin always together.

    Groups (base id + twins) are shuffled with `seed`, then each goes to the side furthest below
    its target size (fraction * number of ids). Deterministic for a given seed and id set; each
    side is returned sorted.
    """
    if not fractions or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions must be non-negative with a positive sum, got {fractions}")
    unique = sorted(set(ids))
    groups: dict[str, list[str]] = {}
    for qid in unique:
        groups.setdefault(longmemeval_base_id(qid), []).append(qid)
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    total = sum(fractions)
    targets = [f / total * len(unique) for f in fractions]
    sides: list[list[str]] = [[] for _ in fractions]
    for base in order:
        deficits = [targets[i] - len(sides[i]) for i in range(len(sides))]
        sides[deficits.index(max(deficits))].extend(groups[base])
    return [sorted(side) for side in sides]


def check_split_leakage(sides: Mapping[str, Iterable[str]], *, source: str = "split") -> None:
    """Raise `SplitLeakageError` if an id, or a base id shared by `x` / `x_abs`, is on two sides."""
    owner: dict[str, str] = {}
    problems = []
    for side, ids in sides.items():
        for qid in ids:
            base = longmemeval_base_id(qid)
            if base in owner and owner[base] != side:
                problems.append(f"{qid!r} ({side}) shares base id {base!r} with {owner[base]}")
            owner.setdefault(base, side)
    if problems:
        raise SplitLeakageError(f"{source}: base-id leakage between sides: " + "; ".join(problems[:10]))


def load_longmemeval_splits(path: str | os.PathLike) -> dict[str, tuple[str, ...]]:
    """Load a splits file such as `splits_dev.json` ({side: [question ids]}) and check it:
    no duplicate ids and no base id on two sides (REFERENCE item 13)."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict) or not data:
        raise _fail(path.name, "expected a non-empty object {side: [question ids]}")
    out: dict[str, tuple[str, ...]] = {}
    for side, ids in data.items():
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise _fail(path.name, f"{side!r} is not a list of question id strings")
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise _fail(path.name, f"{side!r} lists ids more than once: {dupes[:5]}")
        out[side] = tuple(ids)
    check_split_leakage(out, source=path.name)
    return out


# --- PerLTQA ------------------------------------------------------------------------------------


def load_perltqa(path: str | os.PathLike, qa_path: str | os.PathLike | None = None, *,
                 chronological: bool = True) -> list[Conversation]:
    """Load PerLTQA (English v2) into one Conversation per character.

    Format relied on, read from the published files Dataset/en_v2/perltmem_en_v2.json and
    Dataset/en_v2/perltqa_en_v2.json of github.com/Elvin-Yiming-Du/PerLTQA and its
    Dataset/README.md (verified on the first characters of each file, not on every record):
    - memory file: {name: {"profile": {field: value}, "profile_description": str,
      "social_relationship": {"<c>_<r>": {"Supporting Characters", "Description", "Relationship"}},
      "events": {"<c>_<r>_<k>": {"content", "summary", "Characters": [relation ids],
      "Creation Time", "Last Accessed Time", "Theme"}},
      "dialogues": {"<event id>#<n>": {"events": event id,
      "contents": {"YYYY-MM-DD HH:MM": ["Speaker: text", ...]}}}}};
      a list of such objects keyed by profile["Protagonist"] (the form the repository's
      dataset.py reads) is accepted too;
    - QA file: [{name: {"profile": [qa], "social_relationship": [{relation id: [qa]}],
      "events": [{event id: [qa]}], "dialogues": [{dialogue id: [qa]}]}}], each qa
      {"Question", "Answer", "Reference Memory", "Memory Anchors"}; "Reference Memory" is a
      profile field name in the profile section and a Python-literal list string ("['4_0']")
      elsewhere.
    Unverified: that every dialogue line is "Speaker: text" (a line that is not fails loudly),
    the Chinese release (other field names: not supported), and the 8,593-question total.

    Mapping: sessions are the dialogues, one per (dialogue, timestamp), sorted by date;
    `session_id` is the dialogue id, with "/k" appended when a dialogue has several timestamps
    (`source_id` keeps the dialogue id). The protagonist has role "user", everyone else
    "assistant". Question category = QA section name; evidence = the reference memory ids;
    `evidence_sessions` = the dialogue's sessions (dialogues section) or the sessions of the
    dialogues made from that event (events section); empty for profile and relation questions,
    whose answers live in `Conversation.background` (profile, relations, event narratives).
    Memory Anchors are not kept. No question is an abstention; there are no question dates.

    `path` is the memory file (then `qa_path` defaults to the same name with "perltmem" replaced
    by "perltqa") or a folder holding one `perltmem*.json` and one `perltqa*.json`.
    """
    mem_path, qa_file = _perltqa_paths(Path(path), None if qa_path is None else Path(qa_path))
    memory = _read_json(mem_path)
    qa = _read_json(qa_file)
    if isinstance(memory, list):
        memory = {_get(_get(c, "profile", dict, f"{mem_path.name}[{i}]"), "Protagonist", str,
                       f"{mem_path.name}[{i}]: profile"): c for i, c in enumerate(memory)}
    if not isinstance(memory, dict):
        raise _fail(mem_path.name, f"expected an object {{character: memory}}, got {type(memory).__name__}")
    if not isinstance(qa, list):
        raise _fail(qa_file.name, f"expected a list of {{character: questions}}, got {type(qa).__name__}")
    qa_by_name: dict[str, Any] = {}
    for i, entry in enumerate(qa):
        if not isinstance(entry, dict):
            raise _fail(f"{qa_file.name}[{i}]", "expected an object {character: sections}")
        qa_by_name.update(entry)
    unknown = sorted(set(qa_by_name) - set(memory))
    if unknown:
        raise _fail(qa_file.name, f"questions for characters absent from {mem_path.name}: {unknown[:5]}")
    return [_perltqa_character(name, memory[name], qa_by_name.get(name, {}), mem_path.name,
                               qa_file.name, chronological) for name in memory]


def _perltqa_paths(path: Path, qa_path: Path | None) -> tuple[Path, Path]:
    if path.is_dir():
        mems, qas = sorted(path.glob("perltmem*.json")), sorted(path.glob("perltqa*.json"))
        if len(mems) != 1 or (qa_path is None and len(qas) != 1):
            raise FileNotFoundError(f"{path}: expected exactly one perltmem*.json and one perltqa*.json, "
                                    f"found {[p.name for p in mems + qas]}")
        return mems[0], qa_path or qas[0]
    if qa_path is None:
        if "perltmem" not in path.name:
            raise FileNotFoundError(f"{path}: cannot infer the QA file; pass qa_path")
        qa_path = path.with_name(path.name.replace("perltmem", "perltqa"))
    return path, qa_path


def _perltqa_character(name: str, mem: Any, qa: Any, mem_file: str, qa_file: str,
                       chronological: bool) -> Conversation:
    where = f"{mem_file}: {name}"
    profile = {str(k): str(v) for k, v in _get(mem, "profile", dict, where).items()}
    description = _get(mem, "profile_description", str, where, optional=True) or ""
    relations = []
    for rid, rel in _get(mem, "social_relationship", dict, where).items():
        rwhere = f"{where}: social_relationship.{rid}"
        relations.append(Relation(relation_id=rid, name=_get(rel, "Supporting Characters", str, rwhere),
                                  relationship=_get(rel, "Relationship", str, rwhere),
                                  description=_get(rel, "Description", str, rwhere)))
    events = []
    for eid, ev in _get(mem, "events", dict, where).items():
        ewhere = f"{where}: events.{eid}"
        date_text = _get(ev, "Creation Time", str, ewhere)
        chars = _get(ev, "Characters", list, ewhere)
        events.append(LifeEvent(event_id=eid, summary=_get(ev, "summary", str, ewhere),
                                content=_get(ev, "content", str, ewhere), relation_ids=tuple(map(str, chars)),
                                date=parse_loose_date(date_text), date_text=date_text,
                                theme=_get(ev, "Theme", str, ewhere, optional=True) or ""))
    background = CharacterMemory(name=name, profile=profile, description=description,
                                 relations=tuple(relations), events=tuple(events))

    sessions: list[Session] = []
    dialogue_event: dict[str, str] = {}
    for did, dialogue in _get(mem, "dialogues", dict, where).items():
        dwhere = f"{where}: dialogues.{did}"
        dialogue_event[did] = _get(dialogue, "events", str, dwhere)
        contents = _get(dialogue, "contents", dict, dwhere)
        for k, (stamp, lines) in enumerate(contents.items(), start=1):
            swhere = f"{dwhere}: contents[{stamp!r}]"
            date = parse_loose_date(stamp)
            if date is None:
                raise _fail(swhere, "timestamp is not like '2022-05-12 10:00'")
            if not isinstance(lines, list):
                raise _fail(swhere, f"expected a list of 'Speaker: text' lines, got {type(lines).__name__}")
            sid = did if len(contents) == 1 else f"{did}/{k}"
            messages = [_perltqa_line(line, f"{swhere}[{t}]", name, f"{sid}:{t + 1}")
                        for t, line in enumerate(lines)]
            sessions.append(Session(session_id=sid, date=date, date_text=stamp, messages=tuple(messages),
                                    source_id=did if sid != did else None))
    if chronological:
        sessions.sort(key=lambda s: s.date)

    questions = _perltqa_questions(name, qa, sessions, dialogue_event, f"{qa_file}: {name}")
    speakers = tuple(dict.fromkeys([name, *(r.name for r in relations)]))
    return Conversation(conversation_id=name, speakers=speakers, sessions=tuple(sessions),
                        questions=tuple(questions), dataset="perltqa", background=background)


def _perltqa_line(line: Any, where: str, protagonist: str, turn_id: str) -> Message:
    if not isinstance(line, str):
        raise _fail(where, f"dialogue line is a {type(line).__name__}, expected 'Speaker: text'")
    speaker, sep, text = line.partition(": ")
    if not sep or not speaker.strip() or len(speaker) > 80:
        raise _fail(where, f"dialogue line {line[:60]!r} is not 'Speaker: text'")
    speaker = speaker.strip()
    return Message(speaker=speaker, role="user" if speaker == protagonist else "assistant",
                   text=text.strip(), turn_id=turn_id)


def _perltqa_refs(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, list):
        refs = value
    elif isinstance(value, str) and value.startswith("["):
        try:
            refs = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise _fail(where, f"'Reference Memory' {value!r} is not a list literal") from None
    elif isinstance(value, str):
        refs = [value]
    else:
        raise _fail(where, f"'Reference Memory' is a {type(value).__name__}")
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise _fail(where, f"'Reference Memory' {value!r} is not a list of ids")
    return tuple(refs)


def _perltqa_questions(name: str, qa: Any, sessions: list[Session], dialogue_event: dict[str, str],
                       where: str) -> list[Question]:
    if not isinstance(qa, dict):
        raise _fail(where, f"expected an object of sections, got {type(qa).__name__}")
    by_dialogue: dict[str, list[str]] = {}
    for s in sessions:
        by_dialogue.setdefault(s.source_id or s.session_id, []).append(s.session_id)
    by_event: dict[str, list[str]] = {}
    for did, eid in dialogue_event.items():
        by_event.setdefault(eid, []).extend(by_dialogue.get(did, []))

    def evidence_sessions(section: str, refs: tuple[str, ...]) -> tuple[str, ...]:
        table = by_dialogue if section == "dialogues" else by_event if section == "events" else {}
        return tuple(dict.fromkeys(s for r in refs for s in table.get(r, [])))

    out: list[Question] = []
    for section, groups in qa.items():
        if section not in PERLTQA_SECTIONS:
            raise _fail(where, f"unknown section {section!r} (expected one of {PERLTQA_SECTIONS})")
        if not isinstance(groups, list):
            raise _fail(f"{where}: {section}", f"expected a list, got {type(groups).__name__}")
        # the profile section is a flat list of QA items; the others wrap them as {memory id: [qa]}
        if section == "profile":
            flat: list[tuple[str | None, Any]] = [(None, g) for g in groups]
        else:
            flat = []
            for j, g in enumerate(groups):
                if not isinstance(g, dict) or not all(isinstance(v, list) for v in g.values()):
                    raise _fail(f"{where}: {section}[{j}]", "expected an object {memory id: [qa items]}")
                flat.extend((mid, item) for mid, items in g.items() for item in items)
        for i, (mid, item) in enumerate(flat):
            iwhere = f"{where}: {section}[{i}]"
            refs = _perltqa_refs(_get(item, "Reference Memory", (str, list), iwhere), iwhere)
            out.append(Question(
                question_id=f"{name}/{section}/{mid or refs[0]}/{i}",
                question=_get(item, "Question", str, iwhere),
                answer=str(_get(item, "Answer", (str, int, float), iwhere)),
                category=section, evidence=refs, question_date=None, is_abstention=False,
                evidence_sessions=evidence_sessions(section, refs)))
    return out


# --- dispatch -----------------------------------------------------------------------------------

DATA_DIR_ENV = "MEMBUILDER_DATA_DIR"
_LME_HINT = ("download it from https://huggingface.co/datasets/xiaowu0162/longmemeval-cleaned "
             "(or the original xiaowu0162/longmemeval)")
_REGISTRY: dict[str, tuple[Callable[[Path], list[Conversation]], tuple[str, ...], str]] = {
    "locomo": (load_locomo, ("locomo/locomo10.json",),
               "download data/locomo10.json from https://github.com/snap-research/LoCoMo"),
    "longmemeval_s": (load_longmemeval, ("longmemeval/longmemeval_s_cleaned.json",
                                         "longmemeval/longmemeval_s.json", "longmemeval/longmemeval_s.json.gz"),
                      _LME_HINT),
    "longmemeval_m": (load_longmemeval, ("longmemeval/longmemeval_m_cleaned.json",
                                         "longmemeval/longmemeval_m.json", "longmemeval/longmemeval_m.json.gz"),
                      _LME_HINT),
    "longmemeval_oracle": (load_longmemeval, ("longmemeval/longmemeval_oracle.json",
                                              "longmemeval/longmemeval_oracle.json.gz"), _LME_HINT),
    "longmemeval_s_dev": (load_longmemeval, ("longmemeval/longmemeval_s_dev.json.gz",), _LME_HINT),
    "longmemeval_oracle_dev": (load_longmemeval, ("longmemeval/longmemeval_oracle_dev.json.gz",), _LME_HINT),
    "perltqa": (load_perltqa, ("perltqa",),
                "download Dataset/en_v2/perltmem_en_v2.json and perltqa_en_v2.json from "
                "https://github.com/Elvin-Yiming-Du/PerLTQA into one folder"),
}
WORLD_DATASET = "world"  # generated by `membuilder.world`, not read from a file
BENCHMARK_DATASETS = ("memoryagentbench", "memorybench")  # `membuilder.memory_benchmarks`; take options
DATASET_NAMES = (*_REGISTRY, WORLD_DATASET, *BENCHMARK_DATASETS)


def default_data_dir() -> Path:
    """$MEMBUILDER_DATA_DIR, else `../shared/data` next to the repository root."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def load_dataset(name: str, path: str | os.PathLike | None = None, **options: Any) -> list[Conversation]:
    """Load a dataset by name (`DATASET_NAMES`) from `path`, or from the default data folder.

    "world" is generated, not read: `options` are `membuilder.world.load_world`'s (seed,
    conversations, sessions) and `path` must be None.
    """
    if name == WORLD_DATASET:
        if path is not None:
            raise ValueError("the world dataset is generated, not read from a file: pass seed=, conversations=, "
                             f"sessions= instead of a path (got {path!r})")
        from membuilder.world import load_world  # the generator imports this module's types

        return load_world(**options)
    if name in BENCHMARK_DATASETS:
        # options: memoryagentbench split= source= chunk_tokens=; memorybench config= split=
        from membuilder import memory_benchmarks as mb

        root = Path(path) if path is not None else default_data_dir() / name
        loader = mb.load_memoryagentbench if name == "memoryagentbench" else mb.load_memorybench
        return loader(root, **options)
    if options:
        raise ValueError(f"{name}: unexpected options {sorted(options)} (only the world dataset takes options)")
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASET_NAMES)}")
    loader, candidates, hint = _REGISTRY[name]
    if path is not None:
        return loader(Path(path))
    root = default_data_dir()
    for rel in candidates:
        if (root / rel).exists():
            return loader(root / rel)
    raise FileNotFoundError(f"{name}: none of {[str(root / c) for c in candidates]} exists; {hint}, "
                            f"then pass its path (or set {DATA_DIR_ENV})")
