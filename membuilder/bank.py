"""`MemoryBank`: one owner's memory, the operation semantics of DESIGN section 1, and search.

A batch of operations (one session's output of the four agents) is first planned against the
current state without touching it: every operation is checked in order, seeing the effects of the
operations before it. Only a batch with no rejected operation is written, in one store transaction,
after all embeddings are computed; so a bad operation, a failing embedder or an exception inside
the store leaves the bank exactly as it was. Callers that prefer to drop bad operations and keep
the rest (the agent layer) pass `skip_invalid=True` and get the rejections back.

Concurrency: the embeddings of a batch's texts are computed first, without any lock; then the
batch is planned *and* written inside one store transaction, which holds the store's write lock
(for SQLite the file's, so this holds across processes too). Concurrent batches on one owner
therefore serialise: each plans against every batch committed before it, and new entries are
inserted with a plain INSERT, so an id can never be handed out twice or overwritten. A search
that (re-)embeds stored entries writes only vectors (for entries whose text is unchanged) and the
embedder label, never text, status or counters.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Sequence

import numpy as np

from .operations import (
    Add,
    CoreAppend,
    CoreReplace,
    CoreRewrite,
    Delete,
    Merge,
    Operation,
    Skip,
    Update,
    check_allowed,
)
from .embedders import EmbeddingError
from .retrieval import HybridIndex
from .store import MemoryStore, check_owner
from .types import (
    CORE_ENTRY_ID,
    CORE_LIMIT,
    ID_PREFIX,
    BankState,
    HistoryRecord,
    InvalidInputError,
    MemoryEntry,
    MemoryKind,
    OperationRejected,
    OwnerMeta,
    Rejection,
    Status,
    UnknownEntryError,
    check_text,
    excerpt,
    normalise_time,
    time_to_posix,
)

MAX_QUERY_CHARS = 2000  # bounds the text sent to the embedder (REFERENCE item 2)


@dataclass(frozen=True)
class ApplyResult:
    """What one batch changed. `rejected` is non-empty only with `skip_invalid=True`."""

    created: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    retired: tuple[str, ...] = ()
    core_changed: bool = False
    rejected: tuple[Rejection, ...] = ()

    @property
    def touched(self) -> tuple[str, ...]:
        """Ids of active entries this batch created or changed (what attribution counts)."""
        return self.created + self.updated


@dataclass(frozen=True)
class SearchResult:
    entry: MemoryEntry
    score: float
    bm25_rank: int | None
    dense_rank: int | None


@dataclass
class _Plan:
    core: str
    next_id: int
    next_seq: int
    changed: dict[str, MemoryEntry] = field(default_factory=dict)  # id -> new version
    history: list[HistoryRecord] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)
    core_changed: bool = False
    new: list[str] = field(default_factory=list)  # ids of rows this batch inserts (merged-away ones too)
    base: OwnerMeta = field(default_factory=OwnerMeta)  # the owner's meta the plan started from


class MemoryBank:
    """One owner's memory bank over a store.

    Thread-safe, and several bank objects (in one process or many, over one SQLite file) may
    write one owner concurrently: see the module docstring. The search index lives in the object;
    it follows writes made through it and is rebuilt when the owner's history counter shows a
    write made elsewhere, so one bank object per (store, owner) in a process is cheapest
    (`Memory` in `membuilder.api` keeps one).
    """

    def __init__(
        self,
        store: MemoryStore,
        owner: str,
        *,
        embedder=None,
        clock: Callable[[], float] = time.time,
        core_limit: int = CORE_LIMIT,
    ) -> None:
        self.store = store
        self.owner = check_owner(owner)
        self.embedder = embedder
        self.clock = clock
        self.core_limit = core_limit
        self._index: HybridIndex | None = None
        self._index_seq: int | None = None  # the owner's next_seq the index reflects
        self._index_last: HistoryRecord | None = None  # the last history record it reflects
        self._active: dict[str, MemoryEntry] = {}
        self._lock = threading.RLock()  # the index and `_active`; taken before the store's lock

    # --- reads ----------------------------------------------------------------------------------

    @property
    def core(self) -> str:
        return self.store.get_meta(self.owner).core

    def get(self, entry_id: str) -> MemoryEntry:
        if not isinstance(entry_id, str):
            raise InvalidInputError(f"entry id must be a string, got {type(entry_id).__name__}")
        entry = self.store.get_entry(self.owner, entry_id)
        if entry is None:
            raise UnknownEntryError(f"no entry {entry_id!r} for owner {self.owner!r}")
        return entry

    def entries(self, kind: MemoryKind | str | None = None, *, include_retired: bool = False):
        kind = None if kind is None else MemoryKind.parse(kind)
        status = None if include_retired else Status.ACTIVE
        return self.store.list_entries(self.owner, kind=kind, status=status)

    def history(self, entry_id: str | None = None) -> list[HistoryRecord]:
        return self.store.history(self.owner, entry_id)

    def __len__(self) -> int:
        return len(self.store.list_entries(self.owner, status=Status.ACTIVE))

    # --- writes ---------------------------------------------------------------------------------

    def proposed_core(self, operations: Sequence[Operation]) -> str:
        """The core block `operations` would give from the current one if there were no limit.

        Core operations are applied in order with the bank's own rules (`core_after`); a REPLACE
        whose old_text does not occur changes nothing here (`validate` reports it); entry
        operations are ignored. Callers compare the length with `core_limit` to decide on the
        compression step before applying.
        """
        text = self.core
        for op in operations:
            if isinstance(op, (CoreAppend, CoreReplace, CoreRewrite)):
                after = core_after(text, op)
                text = text if after is None else after
        return text

    def validate(self, operations: Sequence[Operation]) -> list[Rejection]:
        """The rejections `apply` would raise for this batch now; changes nothing."""
        with self.store.reading():
            return self._plan(operations).rejected

    def apply(
        self,
        operations: Sequence[Operation],
        *,
        session_id: str | None = None,
        skip_invalid: bool = False,
    ) -> ApplyResult:
        """Apply a batch atomically. Raises `OperationRejected` (nothing applied) if any operation
        is invalid, unless `skip_invalid`, which applies the valid ones and reports the others.

        Safe to call from many threads and processes at once (batches serialise per store; see
        the module docstring). An embedder that fails or returns NaN raises before anything is
        written, so a retry cannot apply a batch twice."""
        ops = _as_batch(operations)
        if session_id is not None:
            check_text(session_id, "session_id")
        vectors = self._embed_texts(_op_texts(ops))  # slow work first, outside every lock
        with self._lock:
            with self.store.transaction():  # plan under the write lock: it sees every earlier commit
                plan = self._plan(ops, session_id=session_id)
                if plan.rejected and not skip_invalid:
                    raise OperationRejected(plan.rejected)
                by_id = self._write(plan, vectors)
            self._after_commit(plan, by_id)
        return ApplyResult(
            created=tuple(plan.created),
            updated=tuple(plan.updated),
            retired=tuple(plan.retired),
            core_changed=plan.core_changed,
            rejected=tuple(plan.rejected),
        )

    def delete(self, entry_id: str, *, session_id: str | None = None) -> None:
        """Retire one active entry with no successor (the `delete` of the public API)."""
        if not isinstance(entry_id, str):
            raise InvalidInputError(f"entry id must be a string, got {type(entry_id).__name__}")
        if session_id is not None:
            check_text(session_id, "session_id")
        with self._lock:
            with self.store.transaction():
                if self.store.get_entry(self.owner, entry_id) is None:
                    raise UnknownEntryError(f"no entry {excerpt(entry_id)} for owner {excerpt(self.owner)}")
                try:
                    entry = self._live_entry(entry_id, None, {})
                except _Reject as exc:
                    raise OperationRejected([Rejection(0, f"DELETE {entry_id}", str(exc))]) from None
                meta = self.store.get_meta(self.owner)
                now = self.clock()
                plan = _Plan(core=meta.core, next_id=meta.next_id, next_seq=meta.next_seq, base=meta)
                plan.changed[entry.id] = replace(entry, status=Status.RETIRED, updated_at=now)
                plan.retired.append(entry.id)
                self._record(plan, entry.id, "DELETE", entry.text, None, session_id, now)
                self._write(plan, {})
            self._after_commit(plan, {})

    # --- planning -------------------------------------------------------------------------------

    def _plan(self, operations: Sequence[Operation], session_id: str | None = None) -> _Plan:
        operations = _as_batch(operations)
        meta = self.store.get_meta(self.owner)
        plan = _Plan(core=meta.core, next_id=meta.next_id, next_seq=meta.next_seq, base=meta)
        now = self.clock()
        for index, op in enumerate(operations):
            try:
                self._plan_one(plan, op, session_id, now)
            except _Reject as exc:
                plan.rejected.append(Rejection(index, op, str(exc)))
        return plan

    def _plan_one(self, plan: _Plan, op: Operation, session_id: str | None, now: float) -> None:
        if not isinstance(op, (CoreAppend, CoreReplace, CoreRewrite, Add, Update, Merge, Skip, Delete)):
            raise _Reject(f"not a memory operation: {type(op).__name__} (parse dicts first)")
        try:
            if not isinstance(op, Delete):  # DELETE is outside the agents' action sets by design
                check_allowed(op)
            _check_op_texts(op)
        except InvalidInputError as exc:
            raise _Reject(str(exc)) from None
        if isinstance(op, (CoreAppend, CoreReplace, CoreRewrite)):
            self._plan_core(plan, op, session_id, now)
        elif isinstance(op, Add):
            entry = self._new_entry(plan, op.kind, op.memory, op.time, session_id, now)
            self._record(plan, entry.id, "ADD", None, entry.text, session_id, now)
        elif isinstance(op, Update):
            cur = self._live_entry(op.id, op.kind, plan.changed)
            new = replace(cur, text=op.new_memory, updated_at=now, event_time=op.time or cur.event_time)
            plan.changed[cur.id] = new
            if cur.id not in plan.created and cur.id not in plan.updated:
                plan.updated.append(cur.id)
            self._record(plan, cur.id, "UPDATE", cur.text, new.text, session_id, now)
        elif isinstance(op, Merge):
            sources = [self._live_entry(i, op.kind, plan.changed) for i in op.ids]
            known = [s.event_time for s in sources if s.event_time]
            when = op.time or (min(known) if known else None)
            entry = self._new_entry(plan, op.kind, op.new_memory, when, session_id, now, op.ids)
            for src in sources:
                plan.changed[src.id] = replace(
                    src, status=Status.RETIRED, retired_by=entry.id, updated_at=now
                )
                if src.id in plan.created:  # created and merged away in one batch
                    plan.created.remove(src.id)
                else:
                    if src.id in plan.updated:
                        plan.updated.remove(src.id)
                    plan.retired.append(src.id)
                self._record(plan, src.id, "RETIRE", src.text, None, session_id, now)
            self._record(plan, entry.id, "MERGE", None, entry.text, session_id, now)
        elif isinstance(op, Delete):  # retire with no successor, as `delete` does, but inside the batch
            cur = self._live_entry(op.id, op.kind, plan.changed)
            plan.changed[cur.id] = replace(cur, status=Status.RETIRED, updated_at=now)
            if cur.id in plan.created:  # created and deleted in one batch: inserted retired
                plan.created.remove(cur.id)
            else:
                if cur.id in plan.updated:
                    plan.updated.remove(cur.id)
                plan.retired.append(cur.id)
            self._record(plan, cur.id, "DELETE", cur.text, None, session_id, now)
        # Skip changes nothing by definition.

    def _plan_core(self, plan: _Plan, op, session_id: str | None, now: float) -> None:
        old = plan.core
        new = core_after(old, op)
        if new is None:
            raise _Reject(f"REPLACE old_text {_clip(op.old_text)!r} does not occur in core memory")
        if len(new) > self.core_limit:
            raise _Reject(
                f"{op.action} would make core memory {len(new)} characters, over the limit of "
                f"{self.core_limit} (compress it first)"
            )
        plan.core = new
        plan.core_changed = True
        self._record(plan, CORE_ENTRY_ID, f"CORE_{op.action}", old, new, session_id, now)

    def _live_entry(self, entry_id: str, kind: MemoryKind | None, changed: dict) -> MemoryEntry:
        entry = changed.get(entry_id) or self.store.get_entry(self.owner, entry_id)
        if entry is None:
            raise _Reject(f"no entry with id {excerpt(entry_id)}")
        if kind is not None and entry.kind != kind:
            raise _Reject(f"entry {excerpt(entry_id)} is {entry.kind.value} memory, not {kind.value}")
        if entry.status is not Status.ACTIVE:
            by = f" (merged into {entry.retired_by})" if entry.retired_by else ""
            raise _Reject(f"entry {excerpt(entry_id)} is retired{by}")
        return entry

    def _new_entry(self, plan, kind, text, when, session_id, now, merged_from=()) -> MemoryEntry:
        entry = MemoryEntry(
            id=f"{ID_PREFIX[kind]}{plan.next_id}",
            owner=self.owner,
            kind=kind,
            text=text,
            status=Status.ACTIVE,
            session_id=session_id,
            event_time=when,
            created_at=now,
            updated_at=now,
            merged_from=tuple(merged_from),
        )
        plan.next_id += 1
        plan.changed[entry.id] = entry
        plan.created.append(entry.id)
        plan.new.append(entry.id)
        return entry

    def _record(self, plan, entry_id, event, old, new, session_id, now) -> None:
        plan.history.append(
            HistoryRecord(self.owner, plan.next_seq, entry_id, event, old, new, session_id, now)
        )
        plan.next_seq += 1

    # --- committing -----------------------------------------------------------------------------

    def _write(self, plan: _Plan, vectors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Write a plan; call inside `store.transaction()`. `vectors`: text -> embedding, computed
        before the transaction. Returns id -> vector of the active entries written."""
        if not plan.history:  # SKIPs, empty batches and all-rejected batches are no-ops
            return {}
        entries = list(plan.changed.values())
        name = self.embedder.name if self.embedder is not None else None
        by_id: dict[str, np.ndarray] = {}
        if name is not None:
            live = [e for e in entries if e.status is Status.ACTIVE]
            missing = [e.text for e in live if e.text not in vectors]
            if missing:  # not expected (every such text comes from an operation), but never skip one
                vectors = {**vectors, **self._embed_texts(missing)}
            by_id = {e.id: vectors[e.text] for e in live}
        new = set(plan.new)
        fresh = [e for e in entries if e.id in new]
        changed = [e for e in entries if e.id not in new]
        self.store.insert_entries(fresh, [by_id.get(e.id) for e in fresh], embedder=name)
        self.store.put_entries(changed, [by_id.get(e.id) for e in changed], embedder=name)
        self.store.set_meta(
            self.owner,
            replace(plan.base, core=plan.core, next_id=plan.next_id, next_seq=plan.next_seq,
                    embedder=name or plan.base.embedder),
        )
        self.store.append_history(plan.history)
        return by_id

    def _after_commit(self, plan: _Plan, by_id: dict[str, np.ndarray]) -> None:
        """Bring the index up to date after a commit; never raises (the store is already right)."""
        if not plan.history or self._index is None:
            return
        if self._index_seq != plan.base.next_seq:  # a write made elsewhere came in between
            self._index = None
            return
        try:
            self._index_changes(list(plan.changed.values()), by_id)
            self._index_seq = plan.next_seq
            self._index_last = plan.history[-1]
        except Exception:  # noqa: BLE001 - rebuilt from the store on the next search
            self._index = None

    def _embed_texts(self, texts: Iterable[str]) -> dict[str, np.ndarray]:
        """text -> checked vector for the distinct texts ({} without an embedder)."""
        distinct = list(dict.fromkeys(texts))
        vecs = self._embed(distinct)
        return {} if vecs is None else dict(zip(distinct, vecs))

    def _embed(self, texts: list[str]) -> np.ndarray | None:
        """[len(texts), dim] float32, checked: one finite row per text, else `EmbeddingError`."""
        if self.embedder is None or not texts:
            return None
        vecs = np.asarray(self.embedder.embed(texts), dtype=np.float32)
        name = getattr(self.embedder, "name", type(self.embedder).__name__)
        if vecs.ndim != 2 or vecs.shape[0] != len(texts) or vecs.shape[1] == 0:
            raise EmbeddingError(
                f"embedder {name} returned shape {vecs.shape} for {len(texts)} texts; nothing was written"
            )
        bad = ~np.isfinite(vecs).all(axis=1)
        if bad.any():
            first = texts[int(np.flatnonzero(bad)[0])]
            raise EmbeddingError(
                f"embedder {name} returned non-finite values (NaN/inf) for {int(bad.sum())} of "
                f"{len(texts)} texts (first: {excerpt(first)}); nothing was written"
            )
        return vecs

    # --- search ---------------------------------------------------------------------------------

    def _ensure_index(self) -> HybridIndex:
        """The index of the owner's active entries; call with `self._lock` held.

        When the owner's history counter moved since it was built (a write made through another
        bank object or process), the entries those history records name are re-read (or, when
        the history was rewritten or too much changed, the index is rebuilt). Missing vectors, or
        vectors of another model, are embedded and stored with `put_embeddings`, which only fills
        in vectors of entries whose text is still the one embedded; the label is moved to this
        embedder only when no write came in between, so it never claims vectors it did not make.
        """
        if self._index is not None:
            if self.store.get_meta(self.owner).next_seq == self._index_seq or self._catch_up():
                return self._index
        name = self.embedder.name if self.embedder is not None else None
        since = getattr(self.store, "history_since", None)  # optional in a store
        for _attempt in range(3):
            with self.store.reading():  # one consistent read of meta, entries and vectors
                meta = self.store.get_meta(self.owner)
                live = self.store.list_entries(self.owner, status=Status.ACTIVE)
                stored = self.store.load_embeddings(self.owner, embedder=name) if name else {}
                last = since(self.owner, meta.next_seq - 1) if since is not None and meta.next_seq > 1 else []
            vectors = {k: v for k, v in stored.items() if np.isfinite(v).all()}  # NaN rows: re-embed
            missing = [e for e in live if e.id not in vectors]
            if name is not None and missing:
                vectors.update(zip((e.id for e in missing), self._embed([e.text for e in missing])))
            moved = False
            writable = not getattr(self.store, "readonly", False)
            if name is not None and live and (missing or meta.embedder != name) and writable:
                with self.store.transaction():
                    if missing:
                        self.store.put_embeddings(
                            self.owner, [(e.id, e.text, vectors[e.id]) for e in missing], name
                        )
                    now = self.store.get_meta(self.owner)
                    moved = now.next_seq != meta.next_seq
                    if not moved and now.embedder != name:  # every active entry has our vector now
                        self.store.set_embedder(self.owner, name)
            if not moved:
                break
        index = HybridIndex()
        if live:
            index.upsert_many(
                [e.id for e in live],
                [e.text for e in live],
                [e.kind.value for e in live],
                [time_to_posix(e.event_time) for e in live],
                np.stack([vectors[e.id] for e in live]) if name is not None else None,
            )
        self._active = {e.id: e for e in live}
        self._index = index
        self._index_seq = meta.next_seq  # if a write still came in between, the next search catches up
        self._index_last = last[0] if last else None
        return index

    def _catch_up(self) -> bool:
        """Apply to the index the writes recorded in history since it was built; False when a
        full rebuild is needed (no `history_since` in the store, history rewritten by a restore
        made elsewhere, or a quarter of the entries changed)."""
        since = getattr(self.store, "history_since", None)
        if since is None or self._index_seq is None:
            return False
        name = self.embedder.name if self.embedder is not None else None
        with self.store.reading():
            meta = self.store.get_meta(self.owner)
            if meta.next_seq < self._index_seq:
                return False
            records = since(self.owner, self._index_seq - 1)
            if self._index_seq > 1:  # the record the index saw last must still be there, unchanged
                if not records or records[0] != self._index_last:
                    return False
                records = records[1:]
            ids = list(dict.fromkeys(r.entry_id for r in records if r.entry_id != CORE_ENTRY_ID))
            if len(ids) > max(64, len(self._active) // 4):
                return False
            entries = [self.store.get_entry(self.owner, i) for i in ids]
            stored = self.store.load_embeddings(self.owner, embedder=name, ids=ids) if name and ids else {}
        reached = records[-1].seq if records else self._index_seq - 1
        if any(e is None for e in entries) or reached != meta.next_seq - 1:
            return False
        live = [e for e in entries if e.status is Status.ACTIVE]
        vectors = {k: v for k, v in stored.items() if np.isfinite(v).all()}
        missing = [e for e in live if e.id not in vectors]
        if name is not None and missing:
            vectors.update(zip((e.id for e in missing), self._embed([e.text for e in missing])))
            if not getattr(self.store, "readonly", False):
                with self.store.transaction():
                    self.store.put_embeddings(self.owner, [(e.id, e.text, vectors[e.id]) for e in missing], name)
        try:
            self._index_changes(entries, vectors)
        except Exception:  # noqa: BLE001 - the caller rebuilds from the store
            self._index = None
            return False
        self._index_seq = meta.next_seq
        if records:
            self._index_last = records[-1]
        return True

    def _index_changes(self, entries: list[MemoryEntry], vectors: dict[str, np.ndarray]) -> None:
        for e in entries:
            if e.status is Status.ACTIVE:
                self._index.upsert(
                    e.id, e.text, kind=e.kind.value, event_time=time_to_posix(e.event_time),
                    embedding=vectors.get(e.id),
                )
                self._active[e.id] = e
            elif e.id in self._active:
                self._index.remove(e.id)
                del self._active[e.id]

    def search(
        self,
        query: str,
        *,
        k: int = 10,
        kinds: Iterable[MemoryKind | str] | MemoryKind | str | None = None,
        time_range: tuple | None = None,
        query_embedding: np.ndarray | None = None,
    ) -> list[SearchResult]:
        """Hybrid (BM25 + embedding, reciprocal-rank fused) search over this owner's active entries.

        `kinds` restricts the kinds; `time_range=(start, end)` (dates/datetimes/ISO strings, either
        side None) keeps entries whose event time is known and inside the range, inclusive; a
        date-only end includes that whole day. Thread-safe.
        """
        if not isinstance(query, str):
            raise InvalidInputError(f"query must be a string, got {type(query).__name__}")
        if not isinstance(k, int) or k <= 0:
            raise InvalidInputError(f"k must be a positive integer, got {k!r}")
        kind_names = None
        if kinds is not None:
            if isinstance(kinds, (str, MemoryKind)):
                kinds = [kinds]
            parsed = [MemoryKind.parse(x) for x in kinds]
            if MemoryKind.CORE in parsed:
                raise InvalidInputError("core memory is not searchable (read `bank.core`)")
            kind_names = [x.value for x in parsed]
        posix_range = None
        if time_range is not None:
            if not isinstance(time_range, (tuple, list)) or len(time_range) != 2:
                raise InvalidInputError(f"time_range must be (start, end), got {excerpt(time_range)}")
            start, end = (normalise_time(t) for t in time_range)
            s, e = time_to_posix(start), time_to_posix(end)
            if end is not None and len(end) == 10:  # a date: through the end of that day
                e += 86400 - 1e-3  # stored times have whole seconds, so this is every one of the day
            posix_range = (None if math.isnan(s) else s, None if math.isnan(e) else e)
            if start is not None and end is not None and s > e:
                raise InvalidInputError(f"time_range starts ({start}) after it ends ({end})")
        if query_embedding is not None:
            query_embedding = np.asarray(query_embedding, dtype=np.float32)
            if not np.isfinite(query_embedding).all():
                raise InvalidInputError("query_embedding has non-finite values (NaN or inf)")
        with self._lock:
            if len(self._ensure_index()) == 0:
                return []
        if query_embedding is None and self.embedder is not None:  # outside the lock: may be slow
            query_embedding = self._embed([query[:MAX_QUERY_CHARS]])[0]
        with self._lock:
            index = self._ensure_index()
            hits = index.search(
                query, k=k, kinds=kind_names, time_range=posix_range, query_embedding=query_embedding
            )
            return [SearchResult(self._active[h.key], h.score, h.bm25_rank, h.dense_rank) for h in hits]

    # --- snapshots ------------------------------------------------------------------------------

    def snapshot(self) -> BankState:
        return self.store.snapshot(self.owner)

    def restore(self, state: BankState) -> None:
        """Make this bank exactly `state` (which may come from another owner or store).

        The whole state is validated first (`BankState.validate` with this bank's core limit): an
        inconsistent state raises `InvalidInputError` and the bank is left as it was."""
        if not isinstance(state, BankState):
            raise InvalidInputError(f"restore takes a BankState, got {type(state).__name__}")
        with self._lock:
            self.store.restore(state, owner=self.owner, core_limit=self.core_limit)
            self._index = None
            self._active = {}


def core_after(core: str, op: CoreAppend | CoreReplace | CoreRewrite) -> str | None:
    """The core block after one core operation, ignoring the limit; None when a REPLACE's
    old_text does not occur. The one statement of how APPEND joins and REPLACE substitutes."""
    if isinstance(op, CoreAppend):
        return core + "\n" + op.content if core else op.content
    if isinstance(op, CoreReplace):
        return core.replace(op.old_text, op.new_text, 1) if op.old_text in core else None
    return op.content


class _Reject(Exception):
    """Internal: one operation is invalid against the current (planned) state."""


def _as_batch(operations) -> list:
    if isinstance(operations, (str, bytes, dict)) or not isinstance(operations, Iterable):
        raise InvalidInputError("operations must be a list of typed operations")
    return list(operations)


def _op_texts(ops: list) -> list[str]:
    """The texts a batch would store (what `apply` embeds before taking the lock)."""
    out = []
    for op in ops:
        text = op.memory if isinstance(op, Add) else op.new_memory if isinstance(op, (Update, Merge)) else None
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                continue  # rejected by the plan; never sent to an embedder
            out.append(text)
    return out


def _check_op_texts(op) -> None:
    """Every text field of an operation is valid Unicode (a lone surrogate cannot be stored)."""
    for name in ("memory", "new_memory", "content", "old_text", "new_text", "id"):
        value = getattr(op, name, None)
        if isinstance(value, str):
            check_text(value, f"'{name}'")
    for i in getattr(op, "ids", ()):
        check_text(i, "'ids[]'")


def _clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."

