"""`MemoryBank`: one owner's memory, the operation semantics of DESIGN section 1, and search.

A batch of operations (one session's output of the four agents) is first planned against the
current state without touching it: every operation is checked in order, seeing the effects of the
operations before it. Only a batch with no rejected operation is written, in one store transaction,
after all embeddings are computed; so a bad operation, a failing embedder or an exception inside
the store leaves the bank exactly as it was. Callers that prefer to drop bad operations and keep
the rest (the agent layer) pass `skip_invalid=True` and get the rejections back.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Sequence

import numpy as np

from .operations import (
    Add,
    CoreAppend,
    CoreReplace,
    CoreRewrite,
    Merge,
    Operation,
    Skip,
    Update,
    check_allowed,
)
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
    Rejection,
    Status,
    UnknownEntryError,
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


class MemoryBank:
    """One owner's memory bank over a store.

    Keep one bank object per (store, owner) in a process: the search index lives in the object and
    only sees writes made through it (`Memory` in `membuilder.api` does this bookkeeping).
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
        self._active: dict[str, MemoryEntry] = {}

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

    def validate(self, operations: Sequence[Operation]) -> list[Rejection]:
        """The rejections `apply` would raise for this batch; changes nothing."""
        return self._plan(operations).rejected

    def apply(
        self,
        operations: Sequence[Operation],
        *,
        session_id: str | None = None,
        skip_invalid: bool = False,
    ) -> ApplyResult:
        """Apply a batch atomically. Raises `OperationRejected` (nothing applied) if any operation
        is invalid, unless `skip_invalid`, which applies the valid ones and reports the others."""
        plan = self._plan(operations, session_id=session_id)
        if plan.rejected and not skip_invalid:
            raise OperationRejected(plan.rejected)
        self._commit(plan)
        return ApplyResult(
            created=tuple(plan.created),
            updated=tuple(plan.updated),
            retired=tuple(plan.retired),
            core_changed=plan.core_changed,
            rejected=tuple(plan.rejected),
        )

    def delete(self, entry_id: str, *, session_id: str | None = None) -> None:
        """Retire one active entry with no successor (the `delete` of the public API)."""
        if self.store.get_entry(self.owner, entry_id) is None:
            raise UnknownEntryError(f"no entry {entry_id!r} for owner {self.owner!r}")
        try:
            entry = self._live_entry(entry_id, None, {})
        except _Reject as exc:
            raise OperationRejected([Rejection(0, f"DELETE {entry_id}", str(exc))]) from None
        meta = self.store.get_meta(self.owner)
        now = self.clock()
        plan = _Plan(core=meta.core, next_id=meta.next_id, next_seq=meta.next_seq)
        plan.changed[entry.id] = replace(entry, status=Status.RETIRED, updated_at=now)
        plan.retired.append(entry.id)
        self._record(plan, entry.id, "DELETE", entry.text, None, session_id, now)
        self._commit(plan)

    # --- planning -------------------------------------------------------------------------------

    def _plan(self, operations: Sequence[Operation], session_id: str | None = None) -> _Plan:
        if isinstance(operations, (str, bytes, dict)) or not isinstance(operations, Iterable):
            raise InvalidInputError("operations must be a list of typed operations")
        meta = self.store.get_meta(self.owner)
        plan = _Plan(core=meta.core, next_id=meta.next_id, next_seq=meta.next_seq)
        now = self.clock()
        for index, op in enumerate(operations):
            try:
                self._plan_one(plan, op, session_id, now)
            except _Reject as exc:
                plan.rejected.append(Rejection(index, op, str(exc)))
        return plan

    def _plan_one(self, plan: _Plan, op: Operation, session_id: str | None, now: float) -> None:
        if not isinstance(op, (CoreAppend, CoreReplace, CoreRewrite, Add, Update, Merge, Skip)):
            raise _Reject(f"not a memory operation: {type(op).__name__} (parse dicts first)")
        try:
            check_allowed(op)
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
        # Skip changes nothing by definition.

    def _plan_core(self, plan: _Plan, op, session_id: str | None, now: float) -> None:
        old = plan.core
        if isinstance(op, CoreAppend):
            new = old + "\n" + op.content if old else op.content
        elif isinstance(op, CoreReplace):
            if op.old_text not in old:
                raise _Reject(f"REPLACE old_text {_clip(op.old_text)!r} does not occur in core memory")
            new = old.replace(op.old_text, op.new_text, 1)
        else:
            new = op.content
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
            raise _Reject(f"no entry with id {entry_id!r}")
        if kind is not None and entry.kind != kind:
            raise _Reject(f"entry {entry_id!r} is {entry.kind.value} memory, not {kind.value}")
        if entry.status is not Status.ACTIVE:
            by = f" (merged into {entry.retired_by})" if entry.retired_by else ""
            raise _Reject(f"entry {entry_id!r} is retired{by}")
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
        return entry

    def _record(self, plan, entry_id, event, old, new, session_id, now) -> None:
        plan.history.append(
            HistoryRecord(self.owner, plan.next_seq, entry_id, event, old, new, session_id, now)
        )
        plan.next_seq += 1

    # --- committing -----------------------------------------------------------------------------

    def _commit(self, plan: _Plan) -> None:
        if not plan.history:  # SKIPs, empty batches and all-rejected batches are no-ops
            return
        entries = list(plan.changed.values())
        live = [e for e in entries if e.status is Status.ACTIVE]
        vectors = self._embed([e.text for e in live])  # before the transaction: a failure writes nothing
        by_id = dict(zip((e.id for e in live), vectors)) if vectors is not None else {}
        meta = self.store.get_meta(self.owner)
        new_meta = replace(
            meta,
            core=plan.core,
            next_id=plan.next_id,
            next_seq=plan.next_seq,
            embedder=self.embedder.name if self.embedder is not None else meta.embedder,
        )
        with self.store.transaction():
            self.store.put_entries(entries, [by_id.get(e.id) for e in entries])
            self.store.set_meta(self.owner, new_meta)
            self.store.append_history(plan.history)
        if self._index is not None:
            self._index_changes(entries, by_id)

    def _embed(self, texts: list[str]) -> np.ndarray | None:
        if self.embedder is None or not texts:
            return None
        vecs = np.asarray(self.embedder.embed(texts), dtype=np.float32)
        if vecs.shape[0] != len(texts):
            raise RuntimeError(f"embedder {self.embedder.name} returned {vecs.shape[0]} vectors for {len(texts)} texts")
        return vecs

    # --- search ---------------------------------------------------------------------------------

    def _ensure_index(self) -> HybridIndex:
        if self._index is not None:
            return self._index
        live = self.store.list_entries(self.owner, status=Status.ACTIVE)
        vectors: dict[str, np.ndarray] = {}
        if self.embedder is not None and live:
            meta = self.store.get_meta(self.owner)
            stored = self.store.load_embeddings(self.owner)
            reusable = meta.embedder == self.embedder.name and all(e.id in stored for e in live)
            if reusable:
                vectors = stored
            else:  # another embedder wrote them (or none did): re-embed once and persist
                fresh = self._embed([e.text for e in live])
                vectors = dict(zip((e.id for e in live), fresh))
                with self.store.transaction():
                    self.store.put_entries(live, [vectors[e.id] for e in live])
                    self.store.set_meta(self.owner, replace(meta, embedder=self.embedder.name))
        index = HybridIndex()
        if live:
            index.upsert_many(
                [e.id for e in live],
                [e.text for e in live],
                [e.kind.value for e in live],
                [time_to_posix(e.event_time) for e in live],
                np.stack([vectors[e.id] for e in live]) if vectors else None,
            )
        self._active = {e.id: e for e in live}
        self._index = index
        return index

    def _index_changes(self, entries: list[MemoryEntry], vectors: dict[str, np.ndarray]) -> None:
        try:
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
        except Exception:
            self._index = None  # the store is right; rebuild the index from it on the next search
            raise

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
        side None) keeps entries whose event time is known and inside the range, inclusive.
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
            start, end = time_range
            s, e = (time_to_posix(normalise_time(t)) for t in (start, end))
            posix_range = (None if math.isnan(s) else s, None if math.isnan(e) else e)
        index = self._ensure_index()
        if len(index) == 0:
            return []
        if query_embedding is None and self.embedder is not None:
            query_embedding = self._embed([query[:MAX_QUERY_CHARS]])[0]
        hits = index.search(
            query, k=k, kinds=kind_names, time_range=posix_range, query_embedding=query_embedding
        )
        return [SearchResult(self._active[h.key], h.score, h.bm25_rank, h.dense_rank) for h in hits]

    # --- snapshots ------------------------------------------------------------------------------

    def snapshot(self) -> BankState:
        return self.store.snapshot(self.owner)

    def restore(self, state: BankState) -> None:
        """Make this bank exactly `state` (which may come from another owner or store)."""
        if not isinstance(state, BankState):
            raise InvalidInputError(f"restore takes a BankState, got {type(state).__name__}")
        self.store.restore(state, owner=self.owner)
        self._index = None
        self._active = {}


class _Reject(Exception):
    """Internal: one operation is invalid against the current (planned) state."""


def _clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."

