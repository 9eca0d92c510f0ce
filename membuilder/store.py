"""Storage behind one small interface: an in-memory store for hot paths, SQLite for persistence.

Stores keep records; they know nothing of the operation semantics (that is `MemoryBank`'s job), so
both implementations are driven by the same test suite. Every write happens inside
`transaction()`: all of it commits or none of it does; reads that must agree with each other go
inside `reading()`, which never takes the write lock. Search is not a store method: the bank keeps
a hybrid index built from `list_entries` and `load_embeddings`, which a server-backed store could
replace with its own.

Concurrency. Both stores may be shared by any number of threads: every method takes the store's
lock, and `transaction()` holds it (and, for SQLite, the database's write lock, `BEGIN IMMEDIATE`)
from start to end, so a bank that plans *inside* the transaction sees every earlier commit.
Several `SQLiteStore` objects (in one process or in many) may open one file: WAL mode lets
readers run while one writer writes; a writer waits up to `busy_timeout` seconds for another's
write lock and then raises `StoreError` having written nothing. Each stored vector records the
embedder that made it, so vectors of two models never mix under one label.
"""

from __future__ import annotations

import bisect
import json
import os
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from .types import (
    CORE_LIMIT,
    BankState,
    HistoryRecord,
    InvalidInputError,
    MemoryEntry,
    MemoryKind,
    OwnerMeta,
    Status,
    StoreError,
    check_state,
    check_text,
    excerpt,
    normalise_time,
)


def id_order(entry_id: str) -> tuple[int, str]:
    """Creation order of bank-made ids (`E12` -> 12); other ids sort after, by text."""
    digits = entry_id[1:]
    return (int(digits), entry_id) if digits.isdigit() else (1 << 62, entry_id)


def check_owner(owner: object) -> str:
    if not isinstance(owner, str) or not owner.strip():
        raise InvalidInputError(f"owner must be a non-empty string, got {excerpt(owner)}")
    return check_text(owner, "owner")


class MemoryStore(Protocol):
    """What a bank needs from storage.

    `embedder` arguments name the model that made the vectors being written; `load_embeddings`
    with an `embedder` returns only that model's vectors.
    """

    readonly: bool

    def transaction(self) -> "contextmanager[None]": ...
    def reading(self) -> "contextmanager[None]": ...
    def owners(self) -> list[str]: ...
    def get_meta(self, owner: str) -> OwnerMeta: ...
    def set_meta(self, owner: str, meta: OwnerMeta) -> None: ...
    def set_embedder(self, owner: str, embedder: str | None) -> None: ...
    def insert_entries(
        self, entries: list[MemoryEntry], embeddings: list[np.ndarray | None], embedder: str | None = None
    ) -> None: ...
    def put_entries(
        self, entries: list[MemoryEntry], embeddings: list[np.ndarray | None], embedder: str | None = None
    ) -> None: ...
    def put_embeddings(self, owner: str, items: list[tuple[str, str, np.ndarray]], embedder: str) -> int: ...
    def get_entry(self, owner: str, entry_id: str) -> MemoryEntry | None: ...
    def list_entries(
        self, owner: str, kind: MemoryKind | None = None, status: Status | None = None
    ) -> list[MemoryEntry]: ...
    def load_embeddings(
        self, owner: str, embedder: str | None = None, ids: list[str] | None = None
    ) -> dict[str, np.ndarray]: ...
    def append_history(self, records: list[HistoryRecord]) -> None: ...
    def history(self, owner: str, entry_id: str | None = None) -> list[HistoryRecord]: ...
    def history_since(self, owner: str, seq: int) -> list[HistoryRecord]: ...
    def snapshot(self, owner: str) -> BankState: ...
    def restore(self, state: BankState, owner: str | None = None, *, core_limit: int = CORE_LIMIT) -> None: ...
    def delete_owner(self, owner: str) -> None: ...
    def close(self) -> None: ...


class _SnapshotMixin:
    """snapshot/restore written once in terms of the bulk primitives, for every store."""

    def snapshot(self, owner: str) -> BankState:
        """The owner's state; the vectors are those of the owner's current embedder label."""
        with self.reading():  # one consistent read, without the write lock
            meta = self.get_meta(owner)
            entries = tuple(self.list_entries(owner))
            vecs = self.load_embeddings(owner, embedder=meta.embedder) if meta.embedder else {}
            history = tuple(self.history(owner))
        embeddings = tuple(sorted((k, np.asarray(v, np.float32).tobytes()) for k, v in vecs.items()))
        return BankState(owner=owner, meta=meta, entries=entries, embeddings=embeddings, history=history)

    def restore(self, state: BankState, owner: str | None = None, *, core_limit: int = CORE_LIMIT) -> None:
        """Replace `owner`'s whole state (default: the state's own owner) with `state`, atomically.

        The whole state is validated first (`check_state`): an inconsistent one raises
        `InvalidInputError` and nothing is written."""
        if not isinstance(state, BankState):
            raise InvalidInputError(f"restore takes a BankState, got {type(state).__name__}")
        check_state(state, core_limit=core_limit)
        owner = check_owner(owner or state.owner)
        vecs = {k: np.frombuffer(v, dtype=np.float32).copy() for k, v in state.embeddings}
        entries = [_with_owner(e, owner) for e in state.entries]
        history = [_with_owner(h, owner) for h in state.history]
        with self.transaction():
            self.delete_owner(owner)
            self.set_meta(owner, state.meta)
            self.put_entries(entries, [vecs.get(e.id) for e in entries], embedder=state.meta.embedder)
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
        self.embeddings: dict[str, tuple[np.ndarray, str | None]] = {}  # id -> (vector, model)
        self.history: list[HistoryRecord] = []


@contextmanager
def undo_log(store: Any) -> Iterator[None]:
    """All or nothing for a store that writes at once: each write appends its undo to
    `store._undo`; an exception runs them newest first. A nested use joins the outer one."""
    if store._undo is not None:
        yield
        return
    store._undo = []
    try:
        yield
    except BaseException:
        for undo in reversed(store._undo):
            undo()
        raise
    finally:
        store._undo = None


class InMemoryStore(_SnapshotMixin):
    """Dicts in process memory. Transactions keep an undo log, so commits cost nothing extra and a
    rollback undoes exactly what the failed transaction wrote. Thread-safe (one re-entrant lock,
    held for a whole transaction); not shared between processes."""

    readonly = False

    def __init__(self) -> None:
        self._owners: dict[str, _OwnerData] = {}
        self._lock = threading.RLock()
        self._undo: list[Callable[[], None]] | None = None

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock, undo_log(self):
            yield

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Reads inside see one state: no transaction of another thread commits in between."""
        with self._lock:
            yield

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

    def set_embedder(self, owner: str, embedder: str | None) -> None:
        with self._lock:
            data = self._data(owner, create=True)
            old = data.meta
            data.meta = OwnerMeta(old.core, old.next_id, old.next_seq, embedder)
            self._write(lambda: setattr(data, "meta", old))

    def insert_entries(self, entries, embeddings, embedder=None) -> None:
        """Add new entries; an id that exists already raises `StoreError` and is left untouched."""
        with self._lock:
            for entry in entries:
                data = self._owners.get(entry.owner)
                if data is not None and entry.id in data.entries:
                    raise StoreError(
                        f"entry {excerpt(entry.id)} of owner {excerpt(entry.owner)} exists already; "
                        "refusing to overwrite it"
                    )
            self.put_entries(entries, embeddings, embedder)

    def put_entries(self, entries, embeddings, embedder=None) -> None:
        """Insert or replace entries with their vectors (`None`: no vector) made by `embedder`."""
        with self._lock:
            for entry, vec in zip(entries, embeddings, strict=True):
                data = self._data(entry.owner, create=True)
                old_entry = data.entries.get(entry.id)
                old_vec = data.embeddings.get(entry.id)
                data.entries[entry.id] = entry
                if vec is None:
                    data.embeddings.pop(entry.id, None)
                else:
                    data.embeddings[entry.id] = (np.array(vec, dtype=np.float32, copy=True), embedder)
                self._write(lambda d=data, i=entry.id, e=old_entry, v=old_vec: _undo_put(d, i, e, v))

    def put_embeddings(self, owner: str, items, embedder: str) -> int:
        """Store vectors for active entries whose text is still the one embedded; never touches
        text, status or meta. Returns how many were stored."""
        with self._lock:
            data = self._owners.get(owner)
            written = 0
            for entry_id, text, vec in items:
                entry = data.entries.get(entry_id) if data else None
                if entry is None or entry.text != text or entry.status is not Status.ACTIVE:
                    continue
                old_vec = data.embeddings.get(entry_id)
                data.embeddings[entry_id] = (np.array(vec, dtype=np.float32, copy=True), embedder)
                self._write(lambda d=data, i=entry_id, e=entry, v=old_vec: _undo_put(d, i, e, v))
                written += 1
            return written

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

    def load_embeddings(self, owner: str, embedder: str | None = None, ids=None) -> dict[str, np.ndarray]:
        """id -> vector; with `embedder`, only the vectors that model made; with `ids`, only those."""
        with self._lock:
            data = self._owners.get(owner)
            if data is None:
                return {}
            items = data.embeddings.items() if ids is None else (
                (i, data.embeddings[i]) for i in ids if i in data.embeddings)
            return {k: v.copy() for k, (v, model) in items if embedder is None or model == embedder}

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

    def history_since(self, owner: str, seq: int) -> list[HistoryRecord]:
        """The owner's history records with seq >= `seq`, in order."""
        with self._lock:
            data = self._owners.get(owner)
            if data is None:
                return []
            return data.history[bisect.bisect_left(data.history, seq, key=lambda h: h.seq):]

    def delete_owner(self, owner: str) -> None:
        with self._lock:
            data = self._owners.pop(owner, None)
            if data is not None:
                self._write(lambda: self._owners.__setitem__(owner, data))

    def close(self) -> None:
        pass


def _undo_put(data: _OwnerData, entry_id: str, entry: MemoryEntry | None, vec: tuple | None):
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
SCHEMA_VERSION = 2  # 2: entries.embedder, the model of each stored vector

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
    embedder TEXT,
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

# Schema 1 had no per-vector model: its vectors are the owner's label's (the only writer then).
_MIGRATE_1_TO_2 = """
ALTER TABLE entries ADD COLUMN embedder TEXT;
UPDATE entries SET embedder = (SELECT o.embedder FROM owners o WHERE o.owner = entries.owner)
    WHERE embedding IS NOT NULL;
"""

_ENTRY_COLUMNS = (
    "owner, id, kind, text, status, session_id, event_time, created_at, updated_at, merged_from, "
    "retired_by"
)


def _is_busy(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


class SQLiteStore(_SnapshotMixin):
    """One SQLite file (WAL mode) holding any number of owners; the embedded default store.

    `busy_timeout`: seconds a write waits for another connection's write lock before it raises
    `StoreError` (nothing written). `readonly=True` opens the file for reading only (a read-only
    file can be inspected); `create=False` refuses a file that is not a bank yet instead of
    writing a schema into it. Safe to share between threads and to open from several processes.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        busy_timeout: float = 5.0,
        readonly: bool = False,
        create: bool = True,
    ) -> None:
        if isinstance(busy_timeout, bool) or not isinstance(busy_timeout, (int, float)) or not busy_timeout >= 0:
            raise InvalidInputError(f"busy_timeout must be a number of seconds >= 0, got {busy_timeout!r}")
        self.path = Path(path)
        self.busy_timeout = float(busy_timeout)
        self.readonly = bool(readonly)
        self._lock = threading.RLock()
        self._depth = 0
        self._reading = False
        self._vector_models = True  # False only for a schema-1 file opened read-only
        self._conn = self._open(self.path, create=create)

    def _open(self, path: Path, *, create: bool) -> sqlite3.Connection:
        if path.is_dir():
            raise StoreError(f"cannot open bank {path}: it is a directory")
        if not path.parent.exists():
            raise StoreError(f"cannot open bank {path}: folder {path.parent} does not exist")
        if not path.exists() and (self.readonly or not create):
            raise StoreError(f"no bank at {path}")
        mode = os.R_OK if self.readonly else os.R_OK | os.W_OK
        if path.exists() and not os.access(path, mode):
            need = "read" if self.readonly else "read/write"
            raise StoreError(f"cannot open bank {path}: no {need} permission")
        try:
            if self.readonly:
                uri = f"{path.resolve().as_uri()}?mode=ro"
                conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False,
                                       timeout=self.busy_timeout)
            else:
                conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False,
                                       timeout=self.busy_timeout)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open bank {path}: {exc}") from exc
        try:
            self._check_file(conn, path, create=create)
        except sqlite3.DatabaseError as exc:
            conn.close()
            if _is_busy(exc):
                raise self._busy_error() from exc
            raise StoreError(f"cannot open bank {path}: {exc} (corrupt or not an SQLite file?)") from exc
        except StoreError:
            conn.close()
            raise
        return conn

    def _check_file(self, conn: sqlite3.Connection, path: Path, *, create: bool) -> None:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if app_id == 0 and tables:
            raise StoreError(
                f"{path} is an SQLite database but not a MemBuilder bank "
                f"(it has tables {sorted(tables)[:5]}); refusing to touch it"
            )
        if app_id not in (0, APPLICATION_ID):
            raise StoreError(f"{path} is an SQLite database of another application (id {app_id:#x})")
        if app_id == 0 and (self.readonly or not create):
            raise StoreError(f"{path} is not a MemBuilder bank (an empty file); nothing was written to it")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if app_id == APPLICATION_ID and version > SCHEMA_VERSION:
            raise StoreError(f"{path} was written by a newer MemBuilder (schema {version})")
        if self.readonly:
            self._vector_models = version >= 2
            return
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        if app_id == 0:
            conn.executescript(
                f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA application_id={APPLICATION_ID}; "
                f"PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"
            )
        elif version < SCHEMA_VERSION:
            conn.execute("BEGIN IMMEDIATE")
            try:  # re-read under the write lock: another process may have migrated meanwhile
                if conn.execute("PRAGMA user_version").fetchone()[0] < 2:
                    for statement in _MIGRATE_1_TO_2.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def _busy_error(self) -> StoreError:
        return StoreError(
            f"bank {self.path} is busy: another connection held its write lock for more than "
            f"{self.busy_timeout:g} s (busy_timeout); nothing was written, try again"
        )

    def _db_error(self, exc: sqlite3.Error) -> StoreError:
        return self._busy_error() if _is_busy(exc) else StoreError(f"bank {self.path}: {exc}")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All writes inside commit together or not at all; holds the file's write lock throughout."""
        with self._lock:
            if self._depth:
                if self._reading:
                    raise StoreError("cannot start a write transaction inside store.reading()")
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            if self.readonly:
                raise StoreError(f"bank {self.path} is open read-only; it cannot be written")
            if self._conn is None:
                raise StoreError(f"bank {self.path} is closed")
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise self._db_error(exc) from exc
            self._depth = 1
            try:
                yield
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                try:
                    self._conn.execute("COMMIT")
                except sqlite3.Error as exc:
                    self._conn.execute("ROLLBACK")
                    raise self._db_error(exc) from exc
            finally:
                self._depth = 0

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Reads inside see one committed state (a WAL read snapshot); never takes the write lock."""
        with self._lock:
            if self._depth:  # inside a transaction or another read: already consistent
                yield
                return
            if self._conn is None:
                raise StoreError(f"bank {self.path} is closed")
            try:
                self._conn.execute("BEGIN DEFERRED")
            except sqlite3.Error as exc:
                raise self._db_error(exc) from exc
            self._depth, self._reading = 1, True
            try:
                yield
            finally:
                self._depth, self._reading = 0, False
                self._conn.execute("COMMIT")  # ends the read snapshot; there is nothing to write

    def _exec(self, sql: str, params=()) -> sqlite3.Cursor:
        if self._conn is None:
            raise StoreError(f"bank {self.path} is closed")
        try:
            return self._conn.execute(sql, params)
        except sqlite3.Error as exc:
            raise self._db_error(exc) from exc

    def _executemany(self, sql: str, rows) -> None:
        try:
            self._conn.executemany(sql, rows)
        except sqlite3.Error as exc:
            raise self._db_error(exc) from exc

    def _check_write(self) -> None:
        if not self._depth or self._reading:
            raise StoreError("store writes must happen inside store.transaction()")

    def owners(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._exec("SELECT owner FROM owners ORDER BY owner")]

    def get_meta(self, owner: str) -> OwnerMeta:
        with self._lock:
            row = self._exec(
                "SELECT core, next_id, next_seq, embedder FROM owners WHERE owner=?", (owner,)
            ).fetchone()
        if row is None:
            return OwnerMeta()
        core, next_id, next_seq, embedder = row
        where = f"bank {self.path}: owner {excerpt(owner)}"
        if not isinstance(core, str):
            raise StoreError(f"{where}: corrupt core (a {type(core).__name__}, not text)")
        for name, value in (("next_id", next_id), ("next_seq", next_seq)):
            if not isinstance(value, int) or value < 1:
                raise StoreError(f"{where}: corrupt {name} {excerpt(value)}")
        if embedder is not None and not isinstance(embedder, str):
            raise StoreError(f"{where}: corrupt embedder name {excerpt(embedder)}")
        return OwnerMeta(core, next_id, next_seq, embedder)

    def set_meta(self, owner: str, meta: OwnerMeta) -> None:
        with self._lock:
            self._check_write()
            self._exec(
                "INSERT INTO owners (owner, core, next_id, next_seq, embedder) VALUES (?,?,?,?,?) "
                "ON CONFLICT(owner) DO UPDATE SET core=excluded.core, next_id=excluded.next_id, "
                "next_seq=excluded.next_seq, embedder=excluded.embedder",
                (owner, meta.core, meta.next_id, meta.next_seq, meta.embedder),
            )

    def set_embedder(self, owner: str, embedder: str | None) -> None:
        """Change only the owner's embedder label (a search that re-embedded writes nothing else)."""
        with self._lock:
            self._check_write()
            self._exec("UPDATE owners SET embedder=? WHERE owner=?", (embedder, owner))

    def _rows(self, entries, embeddings, embedder):
        return [
            (
                e.owner, e.id, e.kind.value, e.text, e.status.value, e.session_id, e.event_time,
                e.created_at, e.updated_at, json.dumps(list(e.merged_from)), e.retired_by,
                None if v is None else np.asarray(v, dtype=np.float32).tobytes(),
                None if v is None else embedder,
            )
            for e, v in zip(entries, embeddings, strict=True)
        ]

    def _ensure_owners(self, entries) -> None:
        for owner in {e.owner for e in entries}:
            self._exec(
                "INSERT OR IGNORE INTO owners (owner, core, next_id, next_seq) VALUES (?, '', 1, 1)",
                (owner,),
            )

    def insert_entries(self, entries, embeddings, embedder=None) -> None:
        """Add new entries with a plain INSERT: an id that exists already raises `StoreError` and
        the existing row is untouched (a planning race can never overwrite an entry)."""
        rows = self._rows(entries, embeddings, embedder)
        with self._lock:
            self._check_write()
            self._ensure_owners(entries)
            try:
                self._conn.executemany(
                    f"INSERT INTO entries ({_ENTRY_COLUMNS}, embedding, embedder) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    rows,
                )
            except sqlite3.IntegrityError as exc:
                ids = [excerpt(e.id) for e in entries]
                raise StoreError(
                    f"bank {self.path}: an entry among {ids[:10]} exists already; refusing to "
                    f"overwrite it ({exc})"
                ) from exc
            except sqlite3.Error as exc:
                raise self._db_error(exc) from exc

    def put_entries(self, entries, embeddings, embedder=None) -> None:
        """Insert or replace entries with their vectors (`None`: no vector) made by `embedder`."""
        rows = self._rows(entries, embeddings, embedder)
        with self._lock:
            self._check_write()
            self._ensure_owners(entries)
            self._executemany(
                f"INSERT OR REPLACE INTO entries ({_ENTRY_COLUMNS}, embedding, embedder) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                rows,
            )

    def put_embeddings(self, owner: str, items, embedder: str) -> int:
        """Store vectors for active entries whose text is still the one embedded; never touches
        text, status or meta, so a concurrent writer's changes survive. Returns how many were stored."""
        with self._lock:
            self._check_write()
            written = 0
            for entry_id, text, vec in items:
                cur = self._exec(
                    "UPDATE entries SET embedding=?, embedder=? "
                    "WHERE owner=? AND id=? AND text=? AND status='active'",
                    (np.asarray(vec, dtype=np.float32).tobytes(), embedder, owner, entry_id, text),
                )
                written += cur.rowcount
            return written

    def _entry(self, row) -> MemoryEntry:
        """A row as an entry; a corrupted row raises `StoreError` naming owner, entry and field."""
        owner, entry_id = row[0], row[1]
        where = f"bank {self.path}: owner {excerpt(owner)} entry {excerpt(entry_id)}"
        field = "kind"
        try:
            kind = MemoryKind(row[2])
            if kind is MemoryKind.CORE:
                raise ValueError(row[2])
            field = "status"
            status = Status(row[4])
            field = "text"
            if not isinstance(row[3], str):
                raise ValueError(row[3])
            field = "merged_from"
            merged = json.loads(row[9])
            if not isinstance(merged, list) or not all(isinstance(x, str) for x in merged):
                raise ValueError(row[9])
            field = "event_time"
            if row[6] is not None and (not isinstance(row[6], str) or normalise_time(row[6]) != row[6]):
                raise ValueError(row[6])
            field = "created_at/updated_at"
            if not all(isinstance(x, (int, float)) for x in (row[7], row[8])):
                raise ValueError((row[7], row[8]))
        except (ValueError, TypeError):  # InvalidInputError and JSONDecodeError are ValueErrors
            shown = {"kind": 2, "status": 4, "text": 3, "merged_from": 9, "event_time": 6}.get(field)
            value = f" {excerpt(row[shown])}" if shown is not None else ""
            raise StoreError(f"{where}: corrupt {field}{value}") from None
        return MemoryEntry(
            owner=owner, id=entry_id, kind=kind, text=row[3], status=status,
            session_id=row[5], event_time=row[6], created_at=float(row[7]), updated_at=float(row[8]),
            merged_from=tuple(merged), retired_by=row[10],
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
            rows = self._exec(sql, params).fetchall()
        out = [self._entry(r) for r in rows]
        out.sort(key=lambda e: id_order(e.id))
        return out

    def load_embeddings(self, owner: str, embedder: str | None = None, ids=None) -> dict[str, np.ndarray]:
        """id -> vector; with `embedder`, only the vectors that model made; with `ids`, only those."""
        sql = "SELECT id, embedding FROM entries WHERE owner=? AND embedding IS NOT NULL"
        params: list = [owner]
        if embedder is not None:
            if self._vector_models:
                sql += " AND embedder=?"
            else:  # schema 1, read-only: every vector is the owner label's
                sql += " AND (SELECT o.embedder FROM owners o WHERE o.owner=entries.owner)=?"
            params.append(embedder)
        with self._lock:
            if ids is None:
                rows = self._exec(sql, params).fetchall()
            else:
                ids, rows = list(ids), []
                for a in range(0, len(ids), 500):  # SQLite caps the number of bound parameters
                    chunk = ids[a : a + 500]
                    rows += self._exec(f"{sql} AND id IN ({','.join('?' * len(chunk))})", params + chunk).fetchall()
        out = {}
        for i, b in rows:
            if not isinstance(b, bytes) or not b or len(b) % 4:
                raise StoreError(
                    f"bank {self.path}: owner {excerpt(owner)} entry {excerpt(i)}: corrupt embedding "
                    f"({len(b) if isinstance(b, bytes) else type(b).__name__} bytes)"
                )
            out[i] = np.frombuffer(b, dtype=np.float32).copy()
        return out

    def append_history(self, records: list[HistoryRecord]) -> None:
        rows = [
            (r.owner, r.seq, r.entry_id, r.event, r.old_text, r.new_text, r.session_id, r.timestamp)
            for r in records
        ]
        with self._lock:
            self._check_write()
            self._executemany("INSERT INTO history VALUES (?,?,?,?,?,?,?,?)", rows)

    def history(self, owner: str, entry_id: str | None = None) -> list[HistoryRecord]:
        sql = "SELECT * FROM history WHERE owner=?"
        params: list = [owner]
        if entry_id is not None:
            sql += " AND entry_id=?"
            params.append(entry_id)
        return self._history(owner, sql, params)

    def history_since(self, owner: str, seq: int) -> list[HistoryRecord]:
        """The owner's history records with seq >= `seq`, in order."""
        return self._history(owner, "SELECT * FROM history WHERE owner=? AND seq>=?", [owner, seq])

    def _history(self, owner: str, sql: str, params: list) -> list[HistoryRecord]:
        with self._lock:
            rows = self._exec(sql + " ORDER BY seq", params).fetchall()
        out = []
        for r in rows:
            if not (isinstance(r[1], int) and isinstance(r[7], (int, float))
                    and all(x is None or isinstance(x, str) for x in (r[4], r[5], r[6]))):
                raise StoreError(f"bank {self.path}: owner {excerpt(owner)} history record {excerpt(r[1])}: corrupt row")
            out.append(HistoryRecord(*r))
        return out

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


def open_store(path: str | os.PathLike | None, *, busy_timeout: float = 5.0) -> MemoryStore:
    """`None` or ":memory:" gives an in-memory store; anything else a SQLite file (created if new)."""
    if path is None or str(path) == ":memory:":
        return InMemoryStore()
    return SQLiteStore(path, busy_timeout=busy_timeout)
