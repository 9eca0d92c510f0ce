"""Value types of the memory model: kinds, entries, history records, bank snapshots, errors."""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from enum import Enum

CORE_LIMIT = 5000  # characters; DESIGN section 1


class MemoryKind(str, Enum):
    CORE = "core"
    EPISODIC = "episodic"
    SEMANTIC = "semantic"
    PROCEDURAL = "procedural"

    @classmethod
    def parse(cls, value: "MemoryKind | str") -> "MemoryKind":
        if isinstance(value, MemoryKind):
            return value
        if isinstance(value, str):
            try:
                return cls(value.strip().lower())
            except ValueError:
                pass
        raise InvalidInputError(
            f"unknown memory kind {value!r}; expected one of {[k.value for k in cls]}"
        )


SEARCHABLE_KINDS: tuple[MemoryKind, ...] = (
    MemoryKind.EPISODIC,
    MemoryKind.SEMANTIC,
    MemoryKind.PROCEDURAL,
)

# Ids name their kind so that an agent (and a human reading a prompt) can tell them apart.
ID_PREFIX = {MemoryKind.EPISODIC: "E", MemoryKind.SEMANTIC: "S", MemoryKind.PROCEDURAL: "P"}


class Status(str, Enum):
    ACTIVE = "active"
    RETIRED = "retired"


@dataclass(frozen=True)
class MemoryEntry:
    """One searchable memory. `event_time` is a normalised ISO-8601 string (see `normalise_time`)."""

    id: str
    owner: str
    kind: MemoryKind
    text: str
    status: Status
    session_id: str | None
    event_time: str | None
    created_at: float
    updated_at: float
    merged_from: tuple[str, ...] = ()
    retired_by: str | None = None

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "owner": self.owner,
            "kind": self.kind.value,
            "text": self.text,
            "status": self.status.value,
            "session_id": self.session_id,
            "event_time": self.event_time,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "merged_from": list(self.merged_from),
            "retired_by": self.retired_by,
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "entry") -> "MemoryEntry":
        """Parse one exported entry; types are checked, never coerced (`InvalidInputError`)."""
        _need_dict(d, where)
        return cls(
            id=_req(d, "id", str, where),
            owner=_req(d, "owner", str, where),
            kind=_kind(_req(d, "kind", str, where), where),
            text=_req(d, "text", str, where),
            status=_status(_req(d, "status", str, where), where),
            session_id=_opt(d, "session_id", str, where),
            event_time=_opt(d, "event_time", str, where),
            created_at=_number(d, "created_at", where),
            updated_at=_number(d, "updated_at", where),
            merged_from=tuple(_str_list(d.get("merged_from", []), f"{where}.merged_from")),
            retired_by=_opt(d, "retired_by", str, where),
        )


CORE_ENTRY_ID = "core"  # history records of the core block use this entry id


@dataclass(frozen=True)
class HistoryRecord:
    """One change to an entry (or to the core block, entry_id == "core"); kept apart from live entries."""

    owner: str
    seq: int  # per-owner, strictly increasing
    entry_id: str
    event: str  # ADD, UPDATE, MERGE, RETIRE, DELETE, CORE_APPEND, CORE_REPLACE, CORE_REWRITE
    old_text: str | None
    new_text: str | None
    session_id: str | None
    timestamp: float

    def to_dict(self) -> dict:
        return {
            "owner": self.owner,
            "seq": self.seq,
            "entry_id": self.entry_id,
            "event": self.event,
            "old_text": self.old_text,
            "new_text": self.new_text,
            "session_id": self.session_id,
            "timestamp": self.timestamp,
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "history record") -> "HistoryRecord":
        """Parse one exported history record; types are checked, never coerced."""
        _need_dict(d, where)
        return cls(
            owner=_req(d, "owner", str, where),
            seq=_req(d, "seq", int, where),
            entry_id=_req(d, "entry_id", str, where),
            event=_req(d, "event", str, where),
            old_text=_opt(d, "old_text", str, where),
            new_text=_opt(d, "new_text", str, where),
            session_id=_opt(d, "session_id", str, where),
            timestamp=_number(d, "timestamp", where),
        )


@dataclass(frozen=True)
class OwnerMeta:
    """Per-owner scalar state: the core block and the counters that make ids stable."""

    core: str = ""
    next_id: int = 1
    next_seq: int = 1
    embedder: str | None = None  # name of the embedder that produced the stored vectors


@dataclass(frozen=True)
class BankState:
    """The exact state of one owner's bank. Embeddings are float32 bytes so states compare with ==."""

    owner: str
    meta: OwnerMeta
    entries: tuple[MemoryEntry, ...]
    embeddings: tuple[tuple[str, bytes], ...]  # (entry id, float32 bytes), sorted by id
    history: tuple[HistoryRecord, ...]
    version: int = 1
    _fingerprint: str = field(default="", compare=False, repr=False)

    def to_dict(self, with_embeddings: bool = True) -> dict:
        import base64

        out = {
            "format": "membuilder.bank",
            "version": self.version,
            "owner": self.owner,
            "core": self.meta.core,
            "next_id": self.meta.next_id,
            "next_seq": self.meta.next_seq,
            "embedder": self.meta.embedder,
            "entries": [e.to_dict() for e in self.entries],
            "history": [h.to_dict() for h in self.history],
        }
        if with_embeddings:
            out["embeddings"] = {k: base64.b64encode(v).decode("ascii") for k, v in self.embeddings}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "BankState":
        """Parse and validate an export (see `check_state`): a state that loads is a consistent one."""
        import base64
        import binascii

        if not isinstance(d, dict) or d.get("format") != "membuilder.bank":
            raise InvalidInputError("not a MemBuilder bank export (missing format 'membuilder.bank')")
        owner = _req(d, "owner", str, "bank")
        where = f"bank {excerpt(owner)}"
        meta = OwnerMeta(
            core=_req(d, "core", str, where) if "core" in d else "",
            next_id=_req(d, "next_id", int, where),
            next_seq=_req(d, "next_seq", int, where),
            embedder=_opt(d, "embedder", str, where),
        )
        raw_vecs = d.get("embeddings") or {}
        if not isinstance(raw_vecs, dict):
            raise InvalidInputError(f"{where}: 'embeddings' must be an object of id -> base64, "
                                    f"got {type(raw_vecs).__name__}")
        embeddings = []
        for key, value in raw_vecs.items():
            if not isinstance(value, str):
                raise InvalidInputError(f"{where}: embedding of {excerpt(key)} must be a base64 string")
            try:
                embeddings.append((key, base64.b64decode(value, validate=True)))
            except (binascii.Error, ValueError) as exc:
                raise InvalidInputError(f"{where}: embedding of {excerpt(key)} is not base64: {exc}") from None
        entries = _req(d, "entries", list, where)
        history = _req(d, "history", list, where)
        version = _req(d, "version", int, where) if "version" in d else 1
        state = cls(
            owner=owner,
            meta=meta,
            entries=tuple(MemoryEntry.from_dict(e, f"{where} entries[{i}]") for i, e in enumerate(entries)),
            embeddings=tuple(sorted(embeddings)),
            history=tuple(HistoryRecord.from_dict(h, f"{where} history[{i}]") for i, h in enumerate(history)),
            version=version,
        )
        check_state(state)
        return state

    def validate(self, core_limit: int = CORE_LIMIT) -> "BankState":
        """Raise `InvalidInputError` naming the first inconsistency (see `check_state`); return self."""
        check_state(self, core_limit=core_limit)
        return self


# --- validation of states and texts -------------------------------------------------------------

HISTORY_EVENTS = frozenset(
    {"ADD", "UPDATE", "MERGE", "RETIRE", "DELETE", "CORE_APPEND", "CORE_REPLACE", "CORE_REWRITE"}
)
_BANK_ID = re.compile(r"^[ESP]([0-9]+)$")  # ids a bank hands out: kind prefix + counter


def excerpt(value: object, n: int = 80) -> str:
    """A bounded repr for error messages: whatever a model or a file put there, at most ~n chars."""
    text = repr(value)
    return text if len(text) <= n else f"{text[: n - 15]}...<{len(text)} chars>"


def check_text(value: object, what: str) -> str:
    """`value` if it is a str that UTF-8 can encode; else `InvalidInputError` naming `what`.

    A lone surrogate ("\\ud83d", as a model can emit through JSON escapes) is a valid Python str
    but no valid Unicode text: SQLite, JSON writers and tokenizers reject it later, far from the
    cause, so it is refused here.
    """
    if not isinstance(value, str):
        raise InvalidInputError(f"{what} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"{what} is not valid Unicode: lone surrogate {value[exc.start]!r} at position {exc.start}"
        ) from None
    return value


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


_MAX_COUNT = 1 << 62  # ids and seqs stay SQLite INTEGERs (< 2**63) with room to count on


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 1 <= x < _MAX_COUNT


def check_state(state: "BankState", *, core_limit: int = CORE_LIMIT) -> None:
    """Check that a state is one a bank could have produced, before anything is written from it.

    Ids unique, bank-made ids below `next_id` (else the next ADD would overwrite one), history seqs
    strictly increasing below `next_seq`, every field of the right type, texts valid Unicode, event
    times normalised ISO-8601, the core within `core_limit`, embeddings finite float32 rows of one
    length naming existing entries. Raises `InvalidInputError` naming the owner, record and field.
    Linear in the state's size; messages are built only on failure (restores are a hot path).
    """
    import numpy as np

    if not isinstance(state, BankState):
        raise InvalidInputError(f"expected a BankState, got {type(state).__name__}")
    if not isinstance(state.owner, str) or not state.owner.strip():
        raise InvalidInputError(f"bank owner must be a non-empty string, got {excerpt(state.owner)}")
    where = f"bank {excerpt(check_text(state.owner, 'bank owner'))}"
    if state.version != 1:
        raise InvalidInputError(f"{where}: unsupported format version {excerpt(state.version)}")
    meta = state.meta
    if not isinstance(meta, OwnerMeta):
        raise InvalidInputError(f"{where}: meta must be an OwnerMeta")
    check_text(meta.core, f"{where}: core")
    if len(meta.core) > core_limit:
        raise InvalidInputError(f"{where}: core is {len(meta.core)} characters, over the limit of {core_limit}")
    for name in ("next_id", "next_seq"):
        if not _is_count(getattr(meta, name)):
            raise InvalidInputError(
                f"{where}: {name} must be an integer from 1 to 2**62, got {excerpt(getattr(meta, name))}"
            )
    if meta.embedder is not None:
        check_text(meta.embedder, f"{where}: embedder")
    ids: set[str] = set()
    for i, e in enumerate(state.entries):
        problem = _entry_problem(e, state.owner, meta.next_id, ids)
        if problem is not None:
            label = excerpt(e.id) if isinstance(e, MemoryEntry) and isinstance(e.id, str) else str(i)
            raise InvalidInputError(f"{where} entry {label}: {problem}")
        ids.add(e.id)
    last = 0
    for i, h in enumerate(state.history):
        problem = _history_problem(h, state.owner, last, meta.next_seq)
        if problem is not None:
            raise InvalidInputError(f"{where} history record {i}: {problem}")
        last = h.seq
    if state.embeddings and meta.embedder is None:
        raise InvalidInputError(f"{where}: has embeddings but no embedder name to say which model made them")
    keys = [k for k, _ in state.embeddings]
    if len(set(keys)) != len(keys):
        raise InvalidInputError(f"{where}: an entry's embedding is given twice")
    sizes = set()
    for key, blob in state.embeddings:
        if key not in ids:
            raise InvalidInputError(f"{where} embedding of {excerpt(key)}: no entry with that id")
        if not isinstance(blob, bytes) or not blob or len(blob) % 4:
            n = len(blob) if isinstance(blob, bytes) else excerpt(blob)
            raise InvalidInputError(f"{where} embedding of {excerpt(key)}: {n} bytes is not a float32 vector")
        sizes.add(len(blob))
    if len(sizes) > 1:
        raise InvalidInputError(f"{where}: embeddings of different lengths {sorted(s // 4 for s in sizes)}")
    if keys:
        rows = np.frombuffer(b"".join(b for _, b in state.embeddings), dtype=np.float32).reshape(len(keys), -1)
        bad = ~np.isfinite(rows).all(axis=1)
        if bad.any():
            key = keys[int(np.flatnonzero(bad)[0])]
            raise InvalidInputError(f"{where} embedding of {excerpt(key)}: non-finite values (NaN or inf)")


def _entry_problem(e: object, owner: str, next_id: int, ids: set[str]) -> str | None:
    """What is wrong with one entry of a state, or None (cheap when nothing is)."""
    if not isinstance(e, MemoryEntry):
        return f"expected a MemoryEntry, got {type(e).__name__}"
    if not isinstance(e.id, str) or not e.id.strip():
        return f"id must be a non-empty string, got {excerpt(e.id)}"
    if e.id in ids:
        return "duplicate id"
    if e.owner != owner:
        return f"owner {excerpt(e.owner)} differs from the bank's"
    if not isinstance(e.kind, MemoryKind) or e.kind is MemoryKind.CORE:
        return f"kind must be episodic, semantic or procedural, got {excerpt(e.kind)}"
    if not isinstance(e.status, Status):
        return f"status must be active or retired, got {excerpt(e.status)}"
    if not isinstance(e.text, str):
        return f"text must be a string, got {type(e.text).__name__}"
    if not e.text.strip():
        return "text is blank"
    for name, value in (("id", e.id), ("text", e.text), ("session_id", e.session_id),
                        ("retired_by", e.retired_by), ("event_time", e.event_time)):
        if value is not None:
            problem = _text_problem(value)
            if problem is not None:
                return f"{name} {problem}"
    if e.event_time is not None and not _is_normal_time(e.event_time):
        return (f"event_time {excerpt(e.event_time)} is not a normalised ISO-8601 date ('2023-05-08') or "
                "datetime ('2023-05-08T13:56:00')")
    if not (_is_number(e.created_at) and _is_number(e.updated_at)):
        return f"created_at/updated_at must be finite numbers, got {excerpt((e.created_at, e.updated_at))}"
    if not isinstance(e.merged_from, tuple) or not all(isinstance(x, str) for x in e.merged_from):
        return f"merged_from must be a list of ids, got {excerpt(e.merged_from)}"
    m = _BANK_ID.match(e.id)
    if m and int(m.group(1)) >= next_id:
        return f"next_id {next_id} is not above this id, so the next ADD would overwrite it"
    return None


def _history_problem(h: object, owner: str, last: int, next_seq: int) -> str | None:
    if not isinstance(h, HistoryRecord):
        return f"expected a HistoryRecord, got {type(h).__name__}"
    if h.owner != owner:
        return f"owner {excerpt(h.owner)} differs from the bank's"
    if not _is_count(h.seq) or h.seq <= last:
        return f"seq {excerpt(h.seq)} is not above the previous record's ({last})"
    if h.seq >= next_seq:
        return f"seq {h.seq} is not below next_seq {next_seq}"
    if h.event not in HISTORY_EVENTS:
        return f"unknown event {excerpt(h.event)}"
    if not isinstance(h.entry_id, str):
        return f"entry_id must be a string, got {excerpt(h.entry_id)}"
    for name, value in (("entry_id", h.entry_id), ("old_text", h.old_text), ("new_text", h.new_text),
                        ("session_id", h.session_id)):
        if value is not None:
            problem = _text_problem(value)
            if problem is not None:
                return f"{name} {problem}"
    if not _is_number(h.timestamp):
        return f"timestamp must be a finite number, got {excerpt(h.timestamp)}"
    return None


def _text_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if value.isascii():  # the common case, and ASCII always encodes
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not valid Unicode: lone surrogate {value[exc.start]!r} at position {exc.start}"
    return None


@functools.lru_cache(maxsize=4096)
def _is_normal_time(value: str) -> bool:
    try:
        return normalise_time(value) == value
    except InvalidInputError:
        return False


def _need_dict(d: object, where: str) -> None:
    if not isinstance(d, dict):
        raise InvalidInputError(f"{where} must be a JSON object, got {type(d).__name__}")


def _req(d: dict, key: str, typ: type, where: str):
    if key not in d:
        raise InvalidInputError(f"{where}: missing field {key!r}")
    return _typed(d[key], key, typ, where)


def _opt(d: dict, key: str, typ: type, where: str):
    value = d.get(key)
    return None if value is None else _typed(value, key, typ, where)


def _typed(value, key: str, typ: type, where: str):
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        name = {int: "an integer", str: "a string", list: "a list"}.get(typ, typ.__name__)
        raise InvalidInputError(f"{where}: {key!r} must be {name}, got {excerpt(value)}")
    return value


def _number(d: dict, key: str, where: str) -> float:
    if key not in d:
        raise InvalidInputError(f"{where}: missing field {key!r}")
    value = d[key]
    if not _is_number(value):
        raise InvalidInputError(f"{where}: {key!r} must be a finite number, got {excerpt(value)}")
    return float(value)


def _str_list(value: object, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise InvalidInputError(f"{where} must be a list of ids, got {excerpt(value)}")
    return value


def _kind(value: str, where: str) -> "MemoryKind":
    try:
        return MemoryKind.parse(value)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{where}: {exc}") from None


def _status(value: str, where: str) -> "Status":
    try:
        return Status(value)
    except ValueError:
        raise InvalidInputError(f"{where}: status must be 'active' or 'retired', got {excerpt(value)}") from None


# --- time ---------------------------------------------------------------------------------------


def normalise_time(value: "str | date | datetime | None") -> str | None:
    """Return an ISO-8601 string: `YYYY-MM-DD` for dates, `YYYY-MM-DDTHH:MM:SS` for datetimes.

    Aware datetimes are converted to UTC and stored naive, so strings order chronologically.
    """
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        return value.replace(microsecond=0).isoformat(timespec="seconds")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            if len(text) == 10:
                return date.fromisoformat(text).isoformat()
            return normalise_time(datetime.fromisoformat(text))
        except ValueError:
            raise InvalidInputError(
                f"event time {value!r} is not an ISO-8601 date or datetime (e.g. '2023-05-08' or "
                "'2023-05-08T13:56:00')"
            ) from None
    raise InvalidInputError(f"event time must be a string, date or datetime, got {type(value).__name__}")


def time_to_posix(value: str | None) -> float:
    """POSIX seconds (UTC) of a normalised time string; NaN when unknown."""
    if value is None:
        return math.nan
    if len(value) == 10:
        value = value + "T00:00:00"
    return datetime.fromisoformat(value).replace(tzinfo=timezone.utc).timestamp()


# --- errors -------------------------------------------------------------------------------------


class MemBuilderError(Exception):
    """Base class of the memory library's errors."""


class InvalidInputError(MemBuilderError, ValueError):
    """Input of the wrong shape or type (malformed operation dict, unknown kind, non-string text)."""


class StoreError(MemBuilderError):
    """The store cannot be opened or used (corrupt, foreign or unreadable file)."""


class UnknownEntryError(MemBuilderError, KeyError):
    """An id that does not exist for this owner."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Rejection:
    """Why one operation of a batch was rejected."""

    index: int
    operation: object
    reason: str

    def __str__(self) -> str:
        shown = str(self.operation)
        if len(shown) > 200:  # a model's 100 kB memory text must not become a 100 kB error message
            shown = f"{shown[:185]}...<{len(shown)} chars>"
        return f"operation {self.index} ({shown}): {self.reason}"


class OperationRejected(MemBuilderError):
    """One or more operations of a batch are invalid against the bank; nothing was applied."""

    def __init__(self, rejections: list[Rejection]):
        self.rejections = list(rejections)
        super().__init__("; ".join(str(r) for r in self.rejections))
