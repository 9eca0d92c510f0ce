"""A small public API in the style of mem0: `add / search / get / update / delete / history`.

    from membuilder import Memory
    m = Memory("bank.sqlite")                     # or Memory() for an in-memory bank
    mid = m.add("Caroline adopted a dog named Max", user_id="u1", kind="semantic")["id"]
    m.search("pets", user_id="u1")
    m.update(mid, "Caroline adopted two dogs", user_id="u1")
    m.history(mid, user_id="u1")

Scoping ids are keyword-only. Construction opens (or creates) the store and nothing else: the
embedding model is loaded on the first write or search that needs it, and nothing touches the
network unless an OpenAI-compatible embedder is configured.

Thread- and process-safety: one `Memory` may be used from any number of threads; several
processes (or several `Memory` objects) may open one SQLite file. Every write is planned and
committed under the store's write lock, so concurrent `add`s on one user each get their own id
and none is lost; a search sees every write committed before it. A write that waits longer than
`busy_timeout` (default 5 s) for another process raises `StoreError` having written nothing.
An in-memory `Memory()` lives in one process only.
"""

from __future__ import annotations

import threading
import time as _time
from typing import Callable

from .bank import MemoryBank
from .embedders import CachedEmbedder, HashingEmbedder, SentenceTransformerEmbedder
from .operations import Add, CoreAppend, Update
from .store import open_store
from .types import CORE_ENTRY_ID, InvalidInputError, MemoryKind


def make_embedder(spec):
    """`"minilm"` (local all-MiniLM-L6-v2), `"hashing"`, `None` (BM25 only) or an Embedder object."""
    if spec is None or not isinstance(spec, str):
        return spec
    if spec == "minilm":
        return CachedEmbedder(SentenceTransformerEmbedder())
    if spec == "hashing":
        return HashingEmbedder()
    raise InvalidInputError(f"unknown embedder {spec!r}; use 'minilm', 'hashing', None or an Embedder")


class Memory:
    """One store, one `MemoryBank` per user id. Thread-safe (see the module docstring)."""

    def __init__(
        self, path=None, *, embedder="minilm", clock: Callable[[], float] = _time.time, busy_timeout: float = 5.0
    ):
        """`busy_timeout`: seconds a write to a SQLite bank waits for another process's write."""
        self.store = open_store(path, busy_timeout=busy_timeout)
        self.embedder = make_embedder(embedder)
        self.clock = clock
        self._banks: dict[str, MemoryBank] = {}
        self._lock = threading.Lock()

    def bank(self, *, user_id: str) -> MemoryBank:
        with self._lock:
            bank = self._banks.get(user_id)
            if bank is None:
                bank = MemoryBank(self.store, user_id, embedder=self.embedder, clock=self.clock)
                self._banks[user_id] = bank
            return bank

    def add(self, text: str, *, user_id: str, kind: str = "semantic", time=None, session_id=None) -> dict:
        """Add one memory; for `kind="core"` the text is appended to the core block."""
        kind = MemoryKind.parse(kind)
        bank = self.bank(user_id=user_id)
        if kind is MemoryKind.CORE:
            bank.apply([CoreAppend(text)], session_id=session_id)
            return {"id": CORE_ENTRY_ID, "kind": "core", "text": bank.core}
        result = bank.apply([Add(kind, text, time)], session_id=session_id)
        return bank.get(result.created[0]).to_dict()

    def search(self, query: str, *, user_id: str, kind=None, limit: int = 10, time_range=None) -> list[dict]:
        hits = self.bank(user_id=user_id).search(query, k=limit, kinds=kind, time_range=time_range)
        return [{**h.entry.to_dict(), "score": h.score} for h in hits]

    def get(self, memory_id: str, *, user_id: str) -> dict:
        return self.bank(user_id=user_id).get(memory_id).to_dict()

    def get_all(self, *, user_id: str, kind=None, include_retired: bool = False) -> list[dict]:
        entries = self.bank(user_id=user_id).entries(kind, include_retired=include_retired)
        return [e.to_dict() for e in entries]

    def core(self, *, user_id: str) -> str:
        return self.bank(user_id=user_id).core

    def update(self, memory_id: str, text: str, *, user_id: str, time=None) -> dict:
        bank = self.bank(user_id=user_id)
        entry = bank.get(memory_id)
        bank.apply([Update(entry.kind, memory_id, text, time)])
        return bank.get(memory_id).to_dict()

    def delete(self, memory_id: str, *, user_id: str) -> None:
        self.bank(user_id=user_id).delete(memory_id)

    def history(self, memory_id: str, *, user_id: str) -> list[dict]:
        bank = self.bank(user_id=user_id)
        if memory_id != CORE_ENTRY_ID:
            bank.get(memory_id)  # unknown ids are an error, not an empty history
        return [h.to_dict() for h in bank.history(memory_id)]

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Memory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
