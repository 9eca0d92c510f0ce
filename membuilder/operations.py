"""Typed memory operations and their strict parsing from agent-style dicts.

The allowed actions per kind are those of DESIGN section 1:

    core        APPEND content | REPLACE old_text -> new_text | REWRITE content
    episodic    ADD memory | UPDATE id -> new_memory | MERGE ids[] -> new_memory
    semantic    ADD memory | UPDATE id -> new_memory | SKIP reason
    procedural  ADD memory | UPDATE id -> new_memory

ADD, UPDATE and MERGE take an optional `time` (the absolute event date, ISO-8601). Every operation
may carry an optional free-text `reason`, which is ignored. Any other field is an error: the same
parser is the reward's validity gate, so it must not accept what the bank would misread, nor
what the bank would fail to store: every text goes through `types.check_text` (a lone surrogate
such as "\\ud83d" is refused here, not by the SQLite write), and an event time that cannot be
converted to UTC (year 1 with a positive offset) is an `InvalidInputError`, never an
`OverflowError`. Errors quote model text through `types.excerpt`, so a message stays short.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from .types import InvalidInputError, MemoryKind, check_text, excerpt, normalise_time


def _text(value: Any, field: str, *, allow_empty: bool = False) -> str:
    check_text(value, f"'{field}'")
    if not allow_empty and not value.strip():
        raise InvalidInputError(f"'{field}' must be a non-empty string")
    return value


def _time(value: Any) -> str | None:
    """`normalise_time`, with a time that overflows when converted to UTC refused as bad input."""
    if isinstance(value, str):
        check_text(value, "'time'")
        if len(value.strip()) > 64:  # no ISO-8601 time is this long; keeps the error message bounded
            raise InvalidInputError(f"event time {excerpt(value)} is not an ISO-8601 date or datetime")
    try:
        return normalise_time(value)
    except OverflowError:
        # e.g. "0001-01-01T00:00:00+01:00": valid ISO-8601, but its UTC instant is before year 1
        raise InvalidInputError(f"event time {excerpt(value)} is out of range once converted to UTC") from None


@dataclass(frozen=True)
class CoreAppend:
    content: str
    kind = MemoryKind.CORE
    action = "APPEND"

    def __post_init__(self):
        _text(self.content, "content")


@dataclass(frozen=True)
class CoreReplace:
    old_text: str
    new_text: str
    kind = MemoryKind.CORE
    action = "REPLACE"

    def __post_init__(self):
        _text(self.old_text, "old_text")
        _text(self.new_text, "new_text", allow_empty=True)


@dataclass(frozen=True)
class CoreRewrite:
    content: str
    kind = MemoryKind.CORE
    action = "REWRITE"

    def __post_init__(self):
        _text(self.content, "content", allow_empty=True)


def _searchable(kind: MemoryKind | str) -> MemoryKind:
    kind = MemoryKind.parse(kind)
    if kind is MemoryKind.CORE:
        raise InvalidInputError("core memory takes APPEND / REPLACE / REWRITE, not entry operations")
    return kind


@dataclass(frozen=True)
class Add:
    kind: MemoryKind
    memory: str
    time: str | None = None
    action = "ADD"

    def __post_init__(self):
        object.__setattr__(self, "kind", _searchable(self.kind))
        _text(self.memory, "memory")
        object.__setattr__(self, "time", _time(self.time))


@dataclass(frozen=True)
class Update:
    kind: MemoryKind
    id: str
    new_memory: str
    time: str | None = None
    action = "UPDATE"

    def __post_init__(self):
        object.__setattr__(self, "kind", _searchable(self.kind))
        _text(self.id, "id")
        _text(self.new_memory, "new_memory")
        object.__setattr__(self, "time", _time(self.time))


@dataclass(frozen=True)
class Merge:
    kind: MemoryKind
    ids: tuple[str, ...]
    new_memory: str
    time: str | None = None
    action = "MERGE"

    def __post_init__(self):
        object.__setattr__(self, "kind", _searchable(self.kind))
        if isinstance(self.ids, str) or not isinstance(self.ids, (list, tuple)):
            raise InvalidInputError(f"'ids' must be a list of entry ids, got {type(self.ids).__name__}")
        ids = tuple(_text(i, "ids[]") for i in self.ids)
        if len(ids) < 2:
            raise InvalidInputError("'ids' must name at least two entries to merge")
        if len(set(ids)) != len(ids):
            raise InvalidInputError(f"'ids' names an entry twice: {excerpt(list(ids))}")
        object.__setattr__(self, "ids", ids)
        _text(self.new_memory, "new_memory")
        object.__setattr__(self, "time", _time(self.time))


@dataclass(frozen=True)
class Skip:
    kind: MemoryKind
    reason: str = ""
    action = "SKIP"

    def __post_init__(self):
        object.__setattr__(self, "kind", _searchable(self.kind))
        _text(self.reason, "reason", allow_empty=True)


@dataclass(frozen=True)
class Delete:
    """Retire one active entry with no successor, inside a batch (the long/short-term architecture's
    DELETE; `membuilder.longshort`). Not in `ALLOWED_ACTIONS`: no MemBuilder agent may emit it, and
    `parse_operation` refuses it; only code that builds typed operations passes it to `bank.apply`."""

    kind: MemoryKind
    id: str
    action = "DELETE"

    def __post_init__(self):
        object.__setattr__(self, "kind", _searchable(self.kind))
        _text(self.id, "id")


Operation = Union[CoreAppend, CoreReplace, CoreRewrite, Add, Update, Merge, Skip, Delete]

ALLOWED_ACTIONS: dict[MemoryKind, frozenset[str]] = {
    MemoryKind.CORE: frozenset({"APPEND", "REPLACE", "REWRITE"}),
    MemoryKind.EPISODIC: frozenset({"ADD", "UPDATE", "MERGE"}),
    MemoryKind.SEMANTIC: frozenset({"ADD", "UPDATE", "SKIP"}),
    MemoryKind.PROCEDURAL: frozenset({"ADD", "UPDATE"}),
}

# action -> (required fields, optional fields); `action` and `reason` are always allowed.
_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "APPEND": (("content",), ()),
    "REPLACE": (("old_text", "new_text"), ()),
    "REWRITE": (("content",), ()),
    "ADD": (("memory",), ("time",)),
    "UPDATE": (("id", "new_memory"), ("time",)),
    "MERGE": (("ids", "new_memory"), ("time",)),
    "SKIP": ((), ()),
    "DELETE": (("id",), ()),  # for operation_to_dict only: parse_operation never accepts DELETE
}


def check_allowed(op: Operation) -> None:
    """Raise if the operation's action is not allowed for its kind (e.g. MERGE on semantic)."""
    if op.action not in ALLOWED_ACTIONS[op.kind]:
        raise InvalidInputError(
            f"{op.action} is not allowed for {op.kind.value} memory "
            f"(allowed: {sorted(ALLOWED_ACTIONS[op.kind])})"
        )


def parse_operation(kind: MemoryKind | str, data: Any) -> Operation:
    """Build a typed operation from an agent-style dict, e.g. `{"action": "ADD", "memory": ...}`."""
    kind = MemoryKind.parse(kind)
    if not isinstance(data, dict):
        raise InvalidInputError(f"an operation must be a JSON object, got {type(data).__name__}")
    action = data.get("action")
    if not isinstance(action, str):
        raise InvalidInputError("operation is missing a string 'action' field")
    action = action.strip().upper()
    if action not in ALLOWED_ACTIONS[kind]:
        raise InvalidInputError(
            f"action {excerpt(action)} is not allowed for {kind.value} memory "
            f"(allowed: {sorted(ALLOWED_ACTIONS[kind])})"
        )
    required, optional = _FIELDS[action]
    missing = [f for f in required if f not in data]
    if missing:
        raise InvalidInputError(f"{action} operation is missing field(s) {missing}")
    unknown = sorted(set(data) - set(required) - set(optional) - {"action", "reason"})
    if unknown:
        raise InvalidInputError(f"{action} operation has unknown field(s) {excerpt(unknown)}")
    time = data.get("time")
    if action == "APPEND":
        return CoreAppend(data["content"])
    if action == "REPLACE":
        return CoreReplace(data["old_text"], data["new_text"])
    if action == "REWRITE":
        return CoreRewrite(data["content"])
    if action == "ADD":
        return Add(kind, data["memory"], time)
    if action == "UPDATE":
        return Update(kind, data["id"], data["new_memory"], time)
    if action == "MERGE":
        return Merge(kind, data["ids"], data["new_memory"], time)
    return Skip(kind, data.get("reason", "") if data.get("reason") is not None else "")


def parse_operations(kind: MemoryKind | str, data: Any) -> list[Operation]:
    """Parse one agent output: `{"operations": [...]}` for entry kinds, one operation for core.

    A core output of `{"operations": [...]}` is accepted too (a list of core operations), and an
    empty list is a valid no-op for every kind. Errors name the offending operation's index.
    """
    kind = MemoryKind.parse(kind)
    if not isinstance(data, dict):
        raise InvalidInputError(f"agent output must be a JSON object, got {type(data).__name__}")
    if "operations" not in data:
        if kind is MemoryKind.CORE:
            return [parse_operation(kind, data)]
        raise InvalidInputError(f"{kind.value} output is missing the 'operations' list")
    extra = sorted(set(data) - {"operations", "reason"})
    if extra:
        raise InvalidInputError(f"{kind.value} output has unknown field(s) {excerpt(extra)}")
    ops = data["operations"]
    if not isinstance(ops, list):
        raise InvalidInputError(f"'operations' must be a list, got {type(ops).__name__}")
    parsed = []
    for i, item in enumerate(ops):
        try:
            parsed.append(parse_operation(kind, item))
        except InvalidInputError as exc:
            raise InvalidInputError(f"operations[{i}]: {exc}") from None
    return parsed


def operation_to_dict(op: Operation) -> dict:
    """The agent-style dict of a typed operation (inverse of `parse_operation`)."""
    out: dict[str, Any] = {"action": op.action}
    for name in _FIELDS[op.action][0] + _FIELDS[op.action][1]:
        value = getattr(op, name)
        if name == "time" and value is None:
            continue
        out[name] = list(value) if name == "ids" else value
    if isinstance(op, Skip) and op.reason:
        out["reason"] = op.reason
    return out
