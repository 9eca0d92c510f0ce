"""Value types of the memory model: kinds, entries, history records, bank snapshots, errors."""

from __future__ import annotations

import math
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
    def from_dict(cls, d: dict) -> "MemoryEntry":
        return cls(
            id=str(d["id"]),
            owner=str(d["owner"]),
            kind=MemoryKind.parse(d["kind"]),
            text=str(d["text"]),
            status=Status(d["status"]),
            session_id=d.get("session_id"),
            event_time=d.get("event_time"),
            created_at=float(d["created_at"]),
            updated_at=float(d["updated_at"]),
            merged_from=tuple(d.get("merged_from") or ()),
            retired_by=d.get("retired_by"),
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
    def from_dict(cls, d: dict) -> "HistoryRecord":
        return cls(
            owner=str(d["owner"]),
            seq=int(d["seq"]),
            entry_id=str(d["entry_id"]),
            event=str(d["event"]),
            old_text=d.get("old_text"),
            new_text=d.get("new_text"),
            session_id=d.get("session_id"),
            timestamp=float(d["timestamp"]),
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
        import base64

        if not isinstance(d, dict) or d.get("format") != "membuilder.bank":
            raise InvalidInputError("not a MemBuilder bank export (missing format 'membuilder.bank')")
        try:
            meta = OwnerMeta(
                core=str(d.get("core", "")),
                next_id=int(d["next_id"]),
                next_seq=int(d["next_seq"]),
                embedder=d.get("embedder"),
            )
            embeddings = tuple(
                sorted((k, base64.b64decode(v)) for k, v in (d.get("embeddings") or {}).items())
            )
            return cls(
                owner=str(d["owner"]),
                meta=meta,
                entries=tuple(MemoryEntry.from_dict(e) for e in d["entries"]),
                embeddings=embeddings,
                history=tuple(HistoryRecord.from_dict(h) for h in d["history"]),
                version=int(d.get("version", 1)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"malformed bank export: {exc!r}") from exc


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
        return f"operation {self.index} ({self.operation}): {self.reason}"


class OperationRejected(MemBuilderError):
    """One or more operations of a batch are invalid against the bank; nothing was applied."""

    def __init__(self, rejections: list[Rejection]):
        self.rejections = list(rejections)
        super().__init__("; ".join(str(r) for r in self.rejections))
