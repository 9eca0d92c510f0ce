"""The session / agent record types (the expert-trajectory format) and their JSONL files.

One format for every trajectory file: what `benchmarks/eval_memory.py --save-trajectories` writes
and what data preparation writes are both lines of `SessionRecord.to_dict()`, read back with
`read_records`. `X.from_dict(x.to_dict())` rebuilds the record exactly: `to_dict` of the result
is the same dict, and the record itself compares equal (a record written without its state keeps
only the snapshot id, see `SessionRecord`).

JSONL files: `write_records` appends one line per record, each with a single `write` on a file
opened in append mode (a line is never interleaved with another writer's line, and a kill leaves
at most one incomplete last line), then flushes and fsyncs. A file whose last line was cut off is
refused by the writer and reported by the reader with its line number, never silently extended.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from membuilder.bank import ApplyResult
from membuilder.operations import CoreRewrite, Operation, operation_to_dict, parse_operation
from membuilder.snapshots import check_snapshot_id, state_digest
from membuilder.types import BankState, InvalidInputError, MemoryKind, Rejection

RECORD_FORMAT = "membuilder.session_record"
RECORD_VERSION = 1


class RecordFormatError(InvalidInputError):
    """A record dict or a line of a records file is malformed; the message names where."""


def _get(d: Mapping[str, Any], key: str, types, where: str, default: Any = ...) -> Any:
    if not isinstance(d, Mapping):
        raise RecordFormatError(f"{where} must be an object, got {type(d).__name__}")
    if key not in d:
        if default is ...:
            raise RecordFormatError(f"{where}.{key} is missing")
        return default
    value = d[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in
                                        (types if isinstance(types, tuple) else (types,))):
        raise RecordFormatError(f"{where}.{key} has type {type(value).__name__}")
    return value


def _ops(kind: MemoryKind, items: Any, where: str) -> tuple[Operation, ...]:
    if not isinstance(items, list):
        raise RecordFormatError(f"{where} must be a list of operations")
    out = []
    for i, item in enumerate(items):
        try:
            out.append(parse_operation(kind, item))
        except InvalidInputError as exc:
            raise RecordFormatError(f"{where}[{i}]: {exc}") from None
    return tuple(out)


def _strs(items: Any, where: str) -> tuple[str, ...]:
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise RecordFormatError(f"{where} must be a list of strings")
    return tuple(items)


@dataclass(frozen=True)
class CompressionRecord:
    """The core compression step: its prompt, raw answer, the REWRITE it gave, or why it failed."""

    messages: list[dict]
    raw_output: str | None
    operation: CoreRewrite | None
    error: str | None
    proposed_chars: int = 0  # length the agent's change would have given the block

    def to_dict(self) -> dict:
        return {"messages": self.messages, "raw_output": self.raw_output,
                "operation": operation_to_dict(self.operation) if self.operation else None,
                "error": self.error, "proposed_chars": self.proposed_chars}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "compression") -> "CompressionRecord":
        op = _get(d, "operation", (dict, type(None)), where)
        operation = None
        if op is not None:
            parsed = _ops(MemoryKind.CORE, [op], f"{where}.operation")[0]
            if not isinstance(parsed, CoreRewrite):
                raise RecordFormatError(f"{where}.operation must be a REWRITE, got {parsed.action}")
            operation = parsed
        return cls(messages=_get(d, "messages", list, where), raw_output=_get(d, "raw_output", (str, type(None)), where),
                   operation=operation, error=_get(d, "error", (str, type(None)), where),
                   proposed_chars=_get(d, "proposed_chars", int, where, 0))


@dataclass(frozen=True)
class AgentRecord:
    """One agent's work for one session: the expert-trajectory format.

    `operations` are those applied (parsed, minus the ones the bank rejected; for a compressed core
    change, the compression's REWRITE); `parsed` all that the answer held; `rejected` the bank's
    reasons; `error` why the agent's work was lost (backend failure, timeout, unparsable answer,
    failed compression), None when it was not. `attempts` are earlier raw answers that failed.
    `valid` is the RL validity gate's verdict on `raw_output` (`membuilder.agents.apply`): it
    parses and the bank accepts every operation as written (None in records made before it existed).
    """

    kind: MemoryKind
    messages: list[dict]
    raw_output: str | None
    operations: tuple[Operation, ...]
    rejected: tuple[str, ...]
    error: str | None
    parsed: tuple[Operation, ...] = ()
    attempts: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    compression: CompressionRecord | None = None
    entry_ids: tuple[str, ...] = ()  # the entries shown in the prompt
    omitted_turns: tuple[str, ...] = ()
    elapsed_s: float = 0.0
    valid: bool | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        return {
            "kind": self.kind.value, "messages": self.messages, "raw_output": self.raw_output,
            "operations": [operation_to_dict(op) for op in self.operations],
            "parsed": [operation_to_dict(op) for op in self.parsed],
            "rejected": list(self.rejected), "error": self.error, "attempts": list(self.attempts),
            "notes": list(self.notes), "compression": self.compression.to_dict() if self.compression else None,
            "entry_ids": list(self.entry_ids), "omitted_turns": list(self.omitted_turns),
            "elapsed_s": self.elapsed_s, "valid": self.valid,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "agent") -> "AgentRecord":
        try:
            kind = MemoryKind.parse(_get(d, "kind", str, where))
        except InvalidInputError as exc:
            raise RecordFormatError(f"{where}.kind: {exc}") from None
        compression = _get(d, "compression", (dict, type(None)), where, None)
        elapsed = _get(d, "elapsed_s", (int, float), where, 0.0)
        return cls(
            kind=kind, messages=_get(d, "messages", list, where),
            raw_output=_get(d, "raw_output", (str, type(None)), where),
            operations=_ops(kind, _get(d, "operations", list, where), f"{where}.operations"),
            rejected=_strs(_get(d, "rejected", list, where), f"{where}.rejected"),
            error=_get(d, "error", (str, type(None)), where),
            parsed=_ops(kind, _get(d, "parsed", list, where, []), f"{where}.parsed"),
            attempts=_strs(_get(d, "attempts", list, where, []), f"{where}.attempts"),
            notes=_strs(_get(d, "notes", list, where, []), f"{where}.notes"),
            compression=None if compression is None else CompressionRecord.from_dict(compression, f"{where}.compression"),
            entry_ids=_strs(_get(d, "entry_ids", list, where, []), f"{where}.entry_ids"),
            omitted_turns=_strs(_get(d, "omitted_turns", list, where, []), f"{where}.omitted_turns"),
            elapsed_s=float(elapsed), valid=_get(d, "valid", (bool, type(None)), where, None))


def _rejection_to_dict(r: Rejection) -> dict:
    op = r.operation
    typed = hasattr(op, "action") and hasattr(op, "kind")
    return {"index": r.index, "kind": op.kind.value if typed else None,
            "operation": operation_to_dict(op) if typed else repr(op), "reason": r.reason}


def _rejection_from_dict(d: Any, where: str) -> Rejection:
    kind = _get(d, "kind", (str, type(None)), where)
    op = _get(d, "operation", (dict, str), where)
    if kind is not None:
        if not isinstance(op, dict):
            raise RecordFormatError(f"{where}.operation must be an object when kind is given")
        op = _ops(MemoryKind.parse(kind), [op], f"{where}.operation")[0]
    return Rejection(_get(d, "index", int, where), op, _get(d, "reason", str, where))


def apply_result_to_dict(result: ApplyResult) -> dict:
    return {"created": list(result.created), "updated": list(result.updated),
            "retired": list(result.retired), "core_changed": result.core_changed,
            "rejected": [r.reason for r in result.rejected],
            "rejections": [_rejection_to_dict(r) for r in result.rejected]}


def apply_result_from_dict(d: Mapping[str, Any], where: str = "result") -> ApplyResult:
    rejections = _get(d, "rejections", list, where, None)
    if rejections is None:  # records written before "rejections" existed keep only the reasons
        rejected = tuple(Rejection(-1, None, r) for r in _strs(_get(d, "rejected", list, where), f"{where}.rejected"))
    else:
        rejected = tuple(_rejection_from_dict(r, f"{where}.rejections[{i}]") for i, r in enumerate(rejections))
    return ApplyResult(created=_strs(_get(d, "created", list, where), f"{where}.created"),
                       updated=_strs(_get(d, "updated", list, where), f"{where}.updated"),
                       retired=_strs(_get(d, "retired", list, where), f"{where}.retired"),
                       core_changed=_get(d, "core_changed", bool, where), rejected=rejected)


@dataclass(frozen=True)
class SessionRecord:
    """One session's run of the four agents.

    The state before the session is carried either in full (`state_before`) or by its
    content-addressed id (`snapshot_id`, see `membuilder.snapshots`); `snapshot_id` is the
    state's digest whichever is given (computed on demand when only the state is held).
    """

    owner: str
    session_id: str
    state_before: BankState | None  # None when the builder was told not to snapshot
    agents: dict[MemoryKind, AgentRecord]
    result: ApplyResult
    session_index: int = 0
    backend: str = ""
    snapshot_id: str | None = None

    def __post_init__(self) -> None:
        if self.snapshot_id is not None:
            check_snapshot_id(self.snapshot_id)

    @property
    def errors(self) -> dict[MemoryKind, str]:
        return {k: r.error for k, r in self.agents.items() if r.error is not None}

    def state_id(self) -> str | None:
        """The snapshot id of the state before (None when the record holds neither)."""
        if self.snapshot_id is not None:
            return self.snapshot_id
        return state_digest(self.state_before) if self.state_before is not None else None

    def to_dict(self, *, with_state: bool = False) -> dict:
        """JSON-ready record; the state before is kept as its id unless `with_state`."""
        out = {
            "format": RECORD_FORMAT, "version": RECORD_VERSION,
            "owner": self.owner, "session_id": self.session_id, "session_index": self.session_index,
            "backend": self.backend,
            "state_before_sha256": self.state_id(),
            "agents": {k.value: r.to_dict() for k, r in self.agents.items()},
            "result": apply_result_to_dict(self.result),
        }
        if with_state and self.state_before is not None:
            out["state_before"] = self.state_before.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "record") -> "SessionRecord":
        fmt = _get(d, "format", str, where, RECORD_FORMAT)
        if fmt != RECORD_FORMAT:
            raise RecordFormatError(f"{where}.format is {fmt!r}, not {RECORD_FORMAT!r}")
        version = _get(d, "version", int, where, RECORD_VERSION)
        if version > RECORD_VERSION:
            raise RecordFormatError(f"{where}.version {version} is newer than this reader ({RECORD_VERSION})")
        state = _get(d, "state_before", dict, where, None)
        state_before = None
        if state is not None:
            try:
                state_before = BankState.from_dict(state)
            except InvalidInputError as exc:
                raise RecordFormatError(f"{where}.state_before: {exc}") from None
        sha = _get(d, "state_before_sha256", (str, type(None)), where, None)
        if sha is not None:
            try:
                check_snapshot_id(sha)
            except InvalidInputError as exc:
                raise RecordFormatError(f"{where}.state_before_sha256: {exc}") from None
        agents_in = _get(d, "agents", dict, where)
        agents = {}
        for name, rec in agents_in.items():
            try:
                kind = MemoryKind.parse(name)
            except InvalidInputError as exc:
                raise RecordFormatError(f"{where}.agents: {exc}") from None
            agents[kind] = AgentRecord.from_dict(rec, f"{where}.agents.{name}")
            if agents[kind].kind is not kind:
                raise RecordFormatError(f"{where}.agents.{name} holds a {agents[kind].kind.value} record")
        return cls(owner=_get(d, "owner", str, where), session_id=_get(d, "session_id", str, where),
                   state_before=state_before, agents=agents,
                   result=apply_result_from_dict(_get(d, "result", dict, where), f"{where}.result"),
                   session_index=_get(d, "session_index", int, where, 0),
                   backend=_get(d, "backend", str, where, ""),
                   snapshot_id=sha if state_before is None else None)


# --- JSONL files -----------------------------------------------------------------------------------


def _ends_cleanly(path: Path) -> bool:
    size = path.stat().st_size
    if size == 0:
        return True
    with open(path, "rb") as fh:
        fh.seek(size - 1)
        return fh.read(1) == b"\n"


def write_records(path: str | os.PathLike, records: Iterable[SessionRecord], *, with_state: bool = False) -> int:
    """Append `records` to the JSONL file at `path` (created if missing), one line each; returns
    how many were written. Every line is serialised before the first write, so a record that
    cannot be serialised writes nothing. Thread- and process-safe for whole lines (O_APPEND)."""
    path = Path(path)
    lines = []
    for i, record in enumerate(records):
        if not isinstance(record, SessionRecord):
            raise InvalidInputError(f"records[{i}] is a {type(record).__name__}, not a SessionRecord")
        lines.append((json.dumps(record.to_dict(with_state=with_state), ensure_ascii=False) + "\n").encode("utf-8"))
    if not lines:
        return 0
    if path.exists() and not _ends_cleanly(path):
        n = sum(1 for _ in open(path, "rb"))
        raise RecordFormatError(f"{path}: line {n} is incomplete (an earlier write was cut off); "
                                "repair or truncate the file before appending")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for line in lines:
            view = memoryview(line)
            while view:  # a regular file takes the whole line in one write; loop for safety
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(lines)


def read_records(path: str | os.PathLike) -> list[SessionRecord]:
    """Every record of a JSONL file written by `write_records` (or by `to_dict` lines), in order.

    Blank lines are skipped; a line that is not JSON or not a record raises `RecordFormatError`
    naming the file and the line number.
    """
    path = Path(path)
    records = []
    with open(path, "r", encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            if not line.endswith("\n"):
                raise RecordFormatError(f"{path}: line {number} is incomplete (no newline: cut off while written?)")
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecordFormatError(f"{path}: line {number} is not JSON: {exc.msg} at column {exc.colno}") from None
            try:
                records.append(SessionRecord.from_dict(data, where=f"line {number}"))
            except RecordFormatError as exc:
                raise RecordFormatError(f"{path}: {exc}") from None
    return records
