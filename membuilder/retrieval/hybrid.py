"""Hybrid search index of one memory bank owner: BM25 + dense embeddings, fused by RRF.

Fusion is reciprocal rank fusion over two ranked lists, each restricted to the entries that pass
the kind / time filters:
  - BM25: the top `pool` entries by BM25 score among those containing a query term (entries
    sharing no term are not ranked; see `BM25Index.top_k` for why matching, not score > 0);
  - dense: the top `pool` entries by cosine, only when the index holds embeddings and the query
    brings a non-zero embedding.
fused(e) = sum over the lists that rank e of 1 / (rrf_k + rank(e)), ranks 1-based; the result is
ordered by fused score descending, then by key, so it is deterministic. `pool` is raised to `k`
when k is larger. Without embeddings (or without a query embedding) this is BM25 ranking.

Embeddings are all-or-none: while the index is non-empty, either every entry has one or none
does; mixing raises ValueError (a bank either has an embedder or not, and a half-embedded index
would silently rank the embedded half above the rest). Emptying the index resets the choice.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np

from ._slots import SlotMap, check_k, check_key, grow, rank_top
from .bm25 import BM25Core, tokenize
from .dense import DenseCore, as_unit_rows, as_vector

KINDS: tuple[str, ...] = ("episodic", "semantic", "procedural")
_KIND_CODE = {name: code for code, name in enumerate(KINDS)}

# Below this fraction of slots passing the filters, gathering the passing rows before the
# matvec reads less memory than scoring every row.
_DENSE_GATHER_FRACTION = 0.25


def kind_code(kind: object) -> int:
    """Small-int code of a searchable kind name (a str or a str-valued Enum such as MemoryKind)."""
    value = kind.value if isinstance(kind, Enum) else kind
    code = _KIND_CODE.get(value) if isinstance(value, str) else None
    if code is None:
        raise ValueError(f"unknown memory kind {kind!r}; expected one of {KINDS}")
    return code


def _event_time(t: object) -> float:
    if t is None:
        return math.nan
    if isinstance(t, bool) or not isinstance(t, (int, float, np.integer, np.floating)):
        raise TypeError(f"event_time must be POSIX seconds (float) or None, got {t!r}")
    if math.isinf(t):
        raise ValueError(f"event_time must be finite, got {t!r}")
    return float(t)  # NaN also means unknown


def _bound(x: object, name: str) -> float | None:
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise TypeError(f"time_range {name} must be POSIX seconds or None, got {x!r}")
    if math.isnan(x):
        raise ValueError(f"time_range {name} is NaN")
    return float(x)


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result: fused RRF score and the entry's 1-based rank in each list (or None)."""

    key: str
    score: float
    bm25_rank: int | None
    dense_rank: int | None


class HybridIndex:
    """Per-owner search index over entry ids with kind and event-time filters. Thread-safe."""

    def __init__(self, *, rrf_k: float = 60, pool: int = 50, dim: int | None = None) -> None:
        if not (isinstance(rrf_k, (int, float)) and math.isfinite(rrf_k) and rrf_k >= 0):
            raise ValueError(f"rrf_k must be a finite number >= 0, got {rrf_k!r}")
        self.rrf_k = float(rrf_k)
        self.pool = check_k(pool)
        self._fixed_dim = dim
        self._lock = threading.RLock()
        self._reset()

    def _reset(self) -> None:
        self._slots = SlotMap()
        self._bm25 = BM25Core()
        self._dense = DenseCore(self._fixed_dim)
        self._kind = np.zeros(0, dtype=np.int8)  # [slots]
        self._time = np.zeros(0, dtype=np.float64)  # [slots] POSIX seconds, NaN = unknown
        self._with_embeddings: bool | None = None  # None while empty

    # ---- inspection -----------------------------------------------------------------------

    def __len__(self) -> int:
        return self._slots.n_live

    def __contains__(self, key: object) -> bool:
        return key in self._slots.slot_of

    def keys(self) -> list[str]:
        """Live keys in insertion order."""
        with self._lock:
            return [k for k in self._slots.keys if k is not None]

    @property
    def has_embeddings(self) -> bool:
        return bool(self._with_embeddings)

    @property
    def dim(self) -> int | None:
        """Embedding dimension once known (from the constructor or the first embedding)."""
        return self._dense.dim

    # ---- mutation -------------------------------------------------------------------------

    def upsert(
        self,
        key: str,
        text: str,
        *,
        kind: str,
        event_time: float | None = None,
        embedding: Sequence[float] | np.ndarray | None = None,  # [dim]
    ) -> None:
        """Insert or replace one entry."""
        rows = None if embedding is None else as_vector(embedding)[None, :]
        self.upsert_many([key], [text], [kind], [event_time], rows)

    def upsert_many(
        self,
        keys: Sequence[str],
        texts: Sequence[str],
        kinds: Sequence[str],
        event_times: Sequence[float | None] | None = None,
        embeddings: np.ndarray | None = None,  # [n, dim]
    ) -> None:
        """Insert or replace many entries in one pass (the fast path for rebuilds).

        All inputs are validated before anything changes; keys must be distinct.
        """
        keys, texts, kinds = list(keys), list(texts), list(kinds)
        n = len(keys)
        times_in = [None] * n if event_times is None else list(event_times)
        if not (len(texts) == len(kinds) == len(times_in) == n):
            raise ValueError(
                f"lengths differ: {n} keys, {len(texts)} texts, {len(kinds)} kinds, "
                f"{len(times_in)} event times"
            )
        for key in keys:
            check_key(key)
        if len(set(keys)) != n:
            raise ValueError("duplicate keys in one upsert_many call")
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"texts must be str, got {type(text).__name__}")
        codes = np.array([kind_code(k) for k in kinds], dtype=np.int8)
        times = np.array([_event_time(t) for t in times_in], dtype=np.float64)
        tokens = [tokenize(t) for t in texts]
        with self._lock:
            replaced = sum(1 for k in keys if k in self._slots.slot_of)
            stays = self._slots.n_live - replaced
            if n == 0:
                return
            with_emb = embeddings is not None
            if stays > 0 and with_emb != self._with_embeddings:
                have = "has embeddings" if self._with_embeddings else "has no embeddings"
                raise ValueError(
                    f"the index {have}; every entry must come "
                    f"{'with' if self._with_embeddings else 'without'} an embedding"
                )
            dim = self._dense.dim if (stays > 0 or self._fixed_dim) else None
            rows = as_unit_rows(embeddings, dim) if with_emb else None
            if rows is not None and rows.shape[0] != n:
                raise ValueError(f"{n} keys but {rows.shape[0]} embeddings")
            for key in keys:
                if key in self._slots.slot_of:
                    self._remove_locked(key)
            if self._slots.n_live == 0:
                self._reset()
            start = self._slots.allocate_many(keys)
            self._bm25.add_docs(tokens)
            if rows is not None:
                self._dense.add_rows(rows)
            end = start + n
            self._kind = grow(self._kind, end)
            self._time = grow(self._time, end, np.nan)
            self._kind[start:end] = codes
            self._time[start:end] = times
            self._with_embeddings = with_emb

    def remove(self, key: str) -> None:
        """Remove an entry; KeyError if `key` is not indexed."""
        with self._lock:
            self._remove_locked(key)

    def _remove_locked(self, key: str) -> None:
        slot = self._slots.free(key)
        self._bm25.remove_doc(slot)
        if self._slots.n_live == 0:
            self._reset()
        elif self._slots.should_compact():
            order = self._slots.compact()
            self._bm25.compact(order)
            if self._with_embeddings:
                self._dense.compact(order)
            self._kind = self._kind[order]
            self._time = self._time[order]

    def clear(self) -> None:
        with self._lock:
            self._reset()

    # ---- search ---------------------------------------------------------------------------

    def _filter(
        self, kinds: Iterable[str] | None, time_range: tuple[object, object] | None
    ) -> np.ndarray:  # [n_slots] bool
        n = self._slots.n_slots
        mask = self._slots.live.copy()
        if kinds is not None:
            wanted = [kinds] if isinstance(kinds, (str, Enum)) else list(kinds)
            if not wanted:
                raise ValueError("kinds is empty; pass None to search every kind")
            codes = {kind_code(k) for k in wanted}
            if len(codes) == 1:
                mask &= self._kind[:n] == codes.pop()
            elif len(codes) < len(KINDS):
                wanted_code = np.zeros(len(KINDS), dtype=bool)
                wanted_code[list(codes)] = True
                mask &= wanted_code[self._kind[:n]]
        if time_range is not None:
            if not isinstance(time_range, (tuple, list)) or len(time_range) != 2:
                raise ValueError(f"time_range must be (start, end), got {time_range!r}")
            start, end = _bound(time_range[0], "start"), _bound(time_range[1], "end")
            if start is not None and end is not None and start > end:
                raise ValueError(f"time_range start {start} is after end {end}")
            t = self._time[:n]
            mask &= ~np.isnan(t)
            if start is not None:
                mask &= t >= start
            if end is not None:
                mask &= t <= end
        return mask

    def search(
        self,
        query: str,
        *,
        k: int = 10,
        kinds: Iterable[str] | None = None,
        time_range: tuple[float | None, float | None] | None = None,
        query_embedding: Sequence[float] | np.ndarray | None = None,  # [dim]
    ) -> list[Hit]:
        """Top-`k` live entries for `query` among those of `kinds` inside `time_range`.

        `time_range` bounds are inclusive POSIX seconds, either may be None; with a range,
        entries of unknown time are excluded. A zero query embedding is ignored.
        """
        k = check_k(k)
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        q_tokens = tokenize(query)
        with self._lock:
            mask = self._filter(kinds, time_range)
            q_unit = None
            if self._with_embeddings and query_embedding is not None:
                q_unit = as_unit_rows(as_vector(query_embedding, "query_embedding")[None, :],
                                      self._dense.dim, "query_embedding")[0]
                if not q_unit.any():
                    q_unit = None
            if not mask.any():
                return []
            pool = max(self.pool, k)
            keys = self._slots.keys
            bm, matched = self._bm25.scores(q_tokens)
            cand = np.flatnonzero(mask & matched)
            lists = [rank_top(cand, bm[cand], pool, keys)]
            if q_unit is not None:
                cand = np.flatnonzero(mask)
                if len(cand) < _DENSE_GATHER_FRACTION * len(mask):
                    dense = self._dense.scores(q_unit, cand)
                else:
                    dense = self._dense.scores(q_unit)[cand]
                lists.append(rank_top(cand, dense, pool, keys))
            ranks: dict[int, list[int | None]] = {}
            for which, ranked in enumerate(lists):
                for rank, slot in enumerate(ranked, start=1):
                    ranks.setdefault(slot, [None, None])[which] = rank
            fused = [
                (sum(1.0 / (self.rrf_k + r) for r in rs if r is not None), keys[slot], rs)
                for slot, rs in ranks.items()
            ]
        fused.sort(key=lambda item: (-item[0], item[1]))
        return [Hit(key, score, rs[0], rs[1]) for score, key, rs in fused[:k]]
