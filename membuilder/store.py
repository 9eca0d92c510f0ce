"""Storage behind one small interface: an in-memory store for hot paths, SQLite for persistence.

Stores keep records; they know nothing of the operation semantics (that is `MemoryBank`'s job), so
both implementations are driven by the same test suite. Every write happens inside
`transaction()`: all of it commits or none of it does. Search is not a store method: the bank keeps
a hybrid index built from `list_entries` and `load_embeddings`, which a server-backed store could
replace with its own.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np

from .types import (
    BankState,
    HistoryRecord,
    InvalidInputError,
    MemoryEntry,
    MemoryKind,
    OwnerMeta,
    Status,
    StoreError,
)


def id_order(entry_id: str) -> tuple[int, str]:
    """Creation order of bank-made ids (`E12` -> 12); other ids sort after, by text."""
    digits = entry_id[1:]
    return (int(digits), entry_id) if digits.isdigit() else (1 << 62, entry_id)


def check_owner(owner: object) -> str:
    if not isinstance(owner, str) or not owner.strip():
        raise InvalidInputError(f"owner must be a non-empty string, got {owner!r}")
    return owner


class MemoryStore(Protocol):
    """What a bank needs from storage."""

    def transaction(self) -> "contextmanager[None]": ...
    def owners(self) -> list[str]: ...
    def get_meta(self, owner: str) -> OwnerMeta: ...
    def set_meta(self, owner: str, meta: OwnerMeta) -> None: ...
    def put_entries(self, entries: list[MemoryEntry], embeddings: list[np.ndarray | None]) -> None: ...
    def get_entry(self, owner: str, entry_id: str) -> MemoryEntry | None: ...
    def list_entries(
        self, owner: str, kind: MemoryKind | None = None, status: Status | None = None
    ) -> list[MemoryEntry]: ...
    def load_embeddings(self, owner: str) -> dict[str, np.ndarray]: ...
    def append_history(self, records: list[HistoryRecord]) -> None: ...
    def history(self, owner: str, entry_id: str | None = None) -> list[HistoryRecord]: ...
    def snapshot(self, owner: str) -> BankState: ...
    def restore(self, state: BankState, owner: str | None = None) -> None: ...
    def delete_owner(self, owner: str) -> None: ...
    def close(self) -> None: ...


class _SnapshotMixin:
    """snapshot/restore written once in terms of the bulk primitives, for every store."""

    def snapshot(self, owner: str) -> BankState:
        with self.transaction():  # a consistent read
            meta = self.get_meta(owner)
            entries = tuple(self.list_entries(owner))
            vecs = self.load_embeddings(owner)
            history = tuple(self.history(owner))
        embeddings = tuple(sorted((k, np.asarray(v, np.float32).tobytes()) for k, v in vecs.items()))
        return BankState(owner=owner, meta=meta, entries=entries, embeddings=embeddings, history=history)

    def restore(self, state: BankState, owner: str | None = None) -> None:
        """Replace `owner`'s whole state (default: the state's own owner) with `state`, atomically."""
        owner = check_owner(owner or state.owner)
        vecs = {k: np.frombuffer(v, dtype=np.float32).copy() for k, v in state.embeddings}
        entries = [_with_owner(e, owner) for e in state.entries]
        history = [_with_owner(h, owner) for h in state.history]
        with self.transaction():
            self.delete_owner(owner)
            self.set_meta(owner, state.meta)
            self.put_entries(entries, [vecs.get(e.id) for e in entries])
            self.append_history(history)


def _with_owner(record, owner: str):
    if record.owner == owner:
        return record
    return type(record)(**{**record.__dict__, "owner": owner})


# --- in-memory ----------------------------------------------------------------------------------


class _OwnerData:
    __slots__ = ("meta", "entries", "embeddings", "history")

    def __init__(self) -> None:
        self.meta = OwnerMeta()
        self.entries: dict[str, MemoryEntry] = {}
        self.embeddings: dict[str, np.ndarray] = {}
        self.history: list[HistoryRecord] = []


class InMemoryStore(_SnapshotMixin):
    """Dicts in process memory. Transactions keep an undo log, so commits cost nothing extra and a
    rollback undoes exactly what the failed transaction wrote."""

    def __init__(self) -> None:
        self._owners: dict[str, _OwnerData] = {}
        self._lock = threading.RLock()
        self._undo: list[Callable[[], None]] | None = None

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            if self._undo is not None:  # nested: part of the outer transaction
                yield
                return
            self._undo = []
            try:
                yield
            except BaseException:
                for undo in reversed(self._undo):
                    undo()
                raise
            finally:
                self._undo = None

    def _write(self, undo: Callable[[], None]) -> None:
        if self._undo is None:
            raise StoreError("store writes must happen inside store.transaction()")
        self._undo.append(undo)

    def _data(self, owner: str, create: bool = False) -> _OwnerData | None:
        data = self._owners.get(owner)
        if data is None and create:
            data = self._owners[owner] = _OwnerData()
            self._write(lambda: self._owners.pop(owner, None))
        return data

    def owners(self) -> list[str]:
        with self._lock:
            return sorted(self._owners)

    def get_meta(self, owner: str) -> OwnerMeta:
        with self._lock:
            data = self._owners.get(owner)
            return data.meta if data else OwnerMeta()

    def set_meta(self, owner: str, meta: OwnerMeta) -> None:
        with self._lock:
            data = self._data(owner, create=True)
            old = data.meta
            data.meta = meta
            self._write(lambda: setattr(data, "meta", old))

    def put_entries(self, entries: list[MemoryEntry], embeddings: list[np.ndarray | None]) -> None:
        with self._lock:
            for entry, vec in zip(entries, embeddings, strict=True):
                data = self._data(entry.owner, create=True)
                old_entry = data.entries.get(entry.id)
                old_vec = data.embeddings.get(entry.id)
                data.entries[entry.id] = entry
                if vec is None:
                    data.embeddings.pop(entry.id, None)
                else:
                    data.embeddings[entry.id] = np.array(vec, dtype=np.float32, copy=True)
                self._write(lambda d=data, i=entry.id, e=old_entry, v=old_vec: _undo_put(d, i, e, v))

    def get_entry(self, owner: str, entry_id: str) -> MemoryEntry | None:
        with self._lock:
            data = self._owners.get(owner)
            return data.entries.get(entry_id) if data else None

    def list_entries(self, owner, kind=None, status=None) -> list[MemoryEntry]:
        with self._lock:
            data = self._owners.get(owner)
            if data is None:
                return []
            out = [
                e
                for e in data.entries.values()
                if (kind is None or e.kind == kind) and (status is None or e.status == status)
            ]
        out.sort(key=lambda e: id_order(e.id))
        return out

    def load_embeddings(self, owner: str) -> dict[str, np.ndarray]:
        with self._lock:
            data = self._owners.get(owner)
            return {k: v.copy() for k, v in data.embeddings.items()} if data else {}

    def append_history(self, records: list[HistoryRecord]) -> None:
        with self._lock:
            for rec in records:
                data = self._data(rec.owner, create=True)
                data.history.append(rec)
                self._write(lambda d=data: d.history.pop())

    def history(self, owner: str, entry_id: str | None = None) -> list[HistoryRecord]:
        with self._lock:
            data = self._owners.get(owner)
            if data is None:
                return []
            return [h for h in data.history if entry_id is None or h.entry_id == entry_id]

    def delete_owner(self, owner: str) -> None:
        with self._lock:
            data = self._owners.pop(owner, None)
            if data is not None:
                self._write(lambda: self._owners.__setitem__(owner, data))

    def close(self) -> None:
        pass


def _undo_put(data: _OwnerData, entry_id: str, entry: MemoryEntry | None, vec: np.ndarray | None):
    if entry is None:
        data.entries.pop(entry_id, None)
    else:
        data.entries[entry_id] = entry
    if vec is None:
        data.embeddings.pop(entry_id, None)
    else:
        data.embeddings[entry_id] = vec


# --- SQLite -------------------------------------------------------------------------------------

APPLICATION_ID = 0x4D454D42  # "MEMB": marks a SQLite file as a MemBuilder bank
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS owners (
    owner TEXT PRIMARY KEY,
    core TEXT NOT NULL,
    next_id INTEGER NOT NULL,
    next_seq INTEGER NOT NULL,
    embedder TEXT
);
CREATE TABLE IF NOT EXISTS entries (
    owner TEXT NOT NULL,
    id TEXT NOT NULL,
    kind TEXT NOT NULL,
    text TEXT NOT NULL,
    status TEXT NOT NULL,
    session_id TEXT,
    event_time TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    merged_from TEXT NOT NULL,
    retired_by TEXT,
    embedding BLOB,
    PRIMARY KEY (owner, id)
);
CREATE INDEX IF NOT EXISTS entries_by_kind ON entries (owner, kind, status);
CREATE TABLE IF NOT EXISTS history (
    owner TEXT NOT NULL,
    seq INTEGER NOT NULL,
    entry_id TEXT NOT NULL,
    event TEXT NOT NULL,
    old_text TEXT,
    new_text TEXT,
    session_id TEXT,
    timestamp REAL NOT NULL,
    PRIMARY KEY (owner, seq)
);
CREATE INDEX IF NOT EXISTS history_by_entry ON history (owner, entry_id);
"""

_ENTRY_COLUMNS = (
    "owner, id, kind, text, status, session_id, event_time, created_at, updated_at, merged_from, "
    "retired_by"
)


class SQLiteStore(_SnapshotMixin):
    """One SQLite file (WAL mode) holding any number of owners; the embedded default store."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._depth = 0
        self._conn = self._open(self.path)

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        if path.is_dir():
            raise StoreError(f"cannot open bank {path}: it is a directory")
        if not path.parent.exists():
            raise StoreError(f"cannot open bank {path}: folder {path.parent} does not exist")
        if path.exists() and not os.access(path, os.R_OK | os.W_OK):
            raise StoreError(f"cannot open bank {path}: no read/write permission")
        try:
            conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open bank {path}: {exc}") from exc
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if app_id == 0 and tables:
                raise StoreError(
                    f"{path} is an SQLite database but not a MemBuilder bank "
                    f"(it has tables {sorted(tables)[:5]}); refusing to touch it"
                )
            if app_id not in (0, APPLICATION_ID):
                raise StoreError(f"{path} is an SQLite database of another application (id {app_id:#x})")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if app_id == APPLICATION_ID and version > SCHEMA_VERSION:
                raise StoreError(f"{path} was written by a newer MemBuilder (schema {version})")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            if app_id == 0:
                conn.executescript(
                    f"BEGIN; {_SCHEMA} PRAGMA application_id={APPLICATION_ID}; "
                    f"PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"
                )
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(f"cannot open bank {path}: {exc} (corrupt or not an SQLite file?)") from exc
        except StoreError:
            conn.close()
            raise
        return conn

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self._conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._conn.execute("COMMIT")
            finally:
                self._depth = 0

    def _exec(self, sql: str, params=()) -> sqlite3.Cursor:
        try:
            return self._conn.execute(sql, params)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"bank {self.path}: {exc}") from exc

    def _check_write(self) -> None:
        if not self._depth:
            raise StoreError("store writes must happen inside store.transaction()")

    def owners(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._exec("SELECT owner FROM owners ORDER BY owner")]

    def get_meta(self, owner: str) -> OwnerMeta:
        with self._lock:
            row = self._exec(
                "SELECT core, next_id, next_seq, embedder FROM owners WHERE owner=?", (owner,)
            ).fetchone()
        return OwnerMeta(*row) if row else OwnerMeta()

    def set_meta(self, owner: str, meta: OwnerMeta) -> None:
        with self._lock:
            self._check_write()
            self._exec(
                "INSERT INTO owners (owner, core, next_id, next_seq, embedder) VALUES (?,?,?,?,?) "
                "ON CONFLICT(owner) DO UPDATE SET core=excluded.core, next_id=excluded.next_id, "
                "next_seq=excluded.next_seq, embedder=excluded.embedder",
                (owner, meta.core, meta.next_id, meta.next_seq, meta.embedder),
            )

    def put_entries(self, entries: list[MemoryEntry], embeddings: list[np.ndarray | None]) -> None:
        rows = [
            (
                e.owner, e.id, e.kind.value, e.text, e.status.value, e.session_id, e.event_time,
                e.created_at, e.updated_at, json.dumps(list(e.merged_from)), e.retired_by,
                None if v is None else np.asarray(v, dtype=np.float32).tobytes(),
            )
            for e, v in zip(entries, embeddings, strict=True)
        ]
        with self._lock:
            self._check_write()
            for owner in {e.owner for e in entries}:
                self._exec(
                    "INSERT OR IGNORE INTO owners (owner, core, next_id, next_seq) VALUES (?, '', 1, 1)",
                    (owner,),
                )
            try:
                self._conn.executemany(
                    f"INSERT OR REPLACE INTO entries ({_ENTRY_COLUMNS}, embedding) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    rows,
                )
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"bank {self.path}: {exc}") from exc

    @staticmethod
    def _entry(row) -> MemoryEntry:
        return MemoryEntry(
            owner=row[0], id=row[1], kind=MemoryKind(row[2]), text=row[3], status=Status(row[4]),
            session_id=row[5], event_time=row[6], created_at=row[7], updated_at=row[8],
            merged_from=tuple(json.loads(row[9])), retired_by=row[10],
        )

    def get_entry(self, owner: str, entry_id: str) -> MemoryEntry | None:
        with self._lock:
            row = self._exec(
                f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE owner=? AND id=?", (owner, entry_id)
            ).fetchone()
        return self._entry(row) if row else None

    def list_entries(self, owner, kind=None, status=None) -> list[MemoryEntry]:
        sql = f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE owner=?"
        params: list = [owner]
        if kind is not None:
            sql += " AND kind=?"
            params.append(MemoryKind(kind).value)
        if status is not None:
            sql += " AND status=?"
            params.append(Status(status).value)
        with self._lock:
            out = [self._entry(r) for r in self._exec(sql, params)]
        out.sort(key=lambda e: id_order(e.id))
        return out

    def load_embeddings(self, owner: str) -> dict[str, np.ndarray]:
        with self._lock:
            rows = self._exec(
                "SELECT id, embedding FROM entries WHERE owner=? AND embedding IS NOT NULL", (owner,)
            ).fetchall()
        return {i: np.frombuffer(b, dtype=np.float32).copy() for i, b in rows}

    def append_history(self, records: list[HistoryRecord]) -> None:
        rows = [
            (r.owner, r.seq, r.entry_id, r.event, r.old_text, r.new_text, r.session_id, r.timestamp)
            for r in records
        ]
        with self._lock:
            self._check_write()
            try:
                self._conn.executemany("INSERT INTO history VALUES (?,?,?,?,?,?,?,?)", rows)
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"bank {self.path}: {exc}") from exc

    def history(self, owner: str, entry_id: str | None = None) -> list[HistoryRecord]:
        sql = "SELECT * FROM history WHERE owner=?"
        params: list = [owner]
        if entry_id is not None:
            sql += " AND entry_id=?"
            params.append(entry_id)
        with self._lock:
            rows = self._exec(sql + " ORDER BY seq", params).fetchall()
        return [HistoryRecord(*r) for r in rows]

    def delete_owner(self, owner: str) -> None:
        with self._lock:
            self._check_write()
            for table in ("entries", "history", "owners"):
                self._exec(f"DELETE FROM {table} WHERE owner=?", (owner,))

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None  # type: ignore[assignment]

    def __enter__(self) -> "SQLiteStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_store(path: str | os.PathLike | None) -> MemoryStore:
    """`None` or ":memory:" gives an in-memory store; anything else a SQLite file (created if new)."""
    if path is None or str(path) == ":memory:":
        return InMemoryStore()
    return SQLiteStore(path)
