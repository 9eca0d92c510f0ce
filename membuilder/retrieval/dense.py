"""Dense (embedding) index: cosine similarity over a growable float32 matrix."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from ._slots import SlotMap, check_k, grow, rank_top


def as_unit_rows(vecs: object, dim: int | None, what: str = "embedding") -> np.ndarray:
    """Validate `vecs` as a finite [n, dim] matrix and L2-normalise its rows (zero rows stay 0)."""
    arr = np.asarray(vecs, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D [n, dim] array, got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{what} has dimension {arr.shape[1]}, the index holds dimension {dim}")
    if arr.shape[1] == 0:
        raise ValueError(f"{what} has dimension 0")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return arr / np.where(norms > 0, norms, 1.0)


def as_vector(vec: object, what: str = "embedding") -> np.ndarray:
    """`vec` as a 1-D float32 array; ValueError for any other shape."""
    arr = np.asarray(vec, dtype=np.float32)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D vector, got shape {arr.shape}")
    return arr


class DenseCore:
    """Unit-normalised vectors addressed by slot (0, 1, ... in insertion order)."""

    def __init__(self, dim: int | None = None) -> None:
        if dim is not None and (not isinstance(dim, int) or dim <= 0):
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.dim = dim
        self.clear()

    def clear(self) -> None:
        self._mat = np.zeros((0, self.dim or 0), dtype=np.float32)  # [capacity, dim]
        self.n_slots = 0

    def add_rows(self, unit_rows: np.ndarray) -> None:  # [n, dim], already validated
        if self.dim is None:
            self.dim = int(unit_rows.shape[1])
            self._mat = np.zeros((0, self.dim), dtype=np.float32)
        end = self.n_slots + unit_rows.shape[0]
        self._mat = grow(self._mat, end)
        self._mat[self.n_slots : end] = unit_rows
        self.n_slots = end

    def compact(self, order: np.ndarray) -> None:
        self._mat = self._mat[order]
        self.n_slots = len(order)

    def scores(
        self,
        query_unit: np.ndarray,  # [dim] float32
        slots: np.ndarray | None = None,  # [m] subset of slots, or None for all
    ) -> np.ndarray:  # [n_slots] or [m] float32 cosine
        mat = self._mat[: self.n_slots]
        # einsum's single-threaded loop streams the matrix at memory bandwidth; BLAS sgemv was
        # no faster on 2 idle cores and 2-3x slower when other processes held the cores.
        return np.einsum("ij,j->i", mat if slots is None else mat[slots], query_unit)


class DenseIndex:
    """Keyed embeddings with cosine scoring (vectors are L2-normalised on the way in).

    `dim` is fixed by the constructor or by the first vector added. Not thread-safe.
    """

    def __init__(self, dim: int | None = None) -> None:
        self._core = DenseCore(dim)
        self._slots = SlotMap()

    @property
    def dim(self) -> int | None:
        return self._core.dim

    def __len__(self) -> int:
        return self._slots.n_live

    def __contains__(self, key: object) -> bool:
        return key in self._slots.slot_of

    def keys(self) -> list[str]:
        """Live keys in insertion order (the order of `scores`)."""
        return [k for k in self._slots.keys if k is not None]

    def add(self, key: str, vec: Sequence[float] | np.ndarray) -> None:
        """Index a new vector; ValueError if `key` is present or the vector is malformed."""
        self.add_many([key], as_vector(vec)[None, :])

    def add_many(self, keys: Sequence[str], vecs: np.ndarray) -> None:  # vecs: [n, dim]
        keys = list(keys)
        rows = as_unit_rows(vecs, self.dim)
        if rows.shape[0] != len(keys):
            raise ValueError(f"{len(keys)} keys but {rows.shape[0]} vectors")
        self._slots.allocate_many(keys)  # validates the keys before anything changes
        self._core.add_rows(rows)

    def remove(self, key: str) -> None:
        """Remove a vector; KeyError if `key` is not indexed."""
        self._slots.free(key)
        if self._slots.should_compact():
            self._core.compact(self._slots.compact())

    def clear(self) -> None:
        self._core.clear()
        self._slots.clear()

    def _query(self, query_vec: object) -> np.ndarray:
        if self.dim is None:
            raise ValueError("the dense index is empty and has no dimension yet")
        return as_unit_rows(as_vector(query_vec, "query")[None, :], self.dim, "query")[0]

    def scores(self, query_vec: Sequence[float] | np.ndarray) -> tuple[list[str], np.ndarray]:
        """(live keys in insertion order, their cosine similarity to `query_vec`)."""
        if len(self) == 0:
            return [], np.zeros(0, dtype=np.float32)
        return self.keys(), self._core.scores(self._query(query_vec))[self._slots.live]

    def top_k(
        self,
        query_vec: Sequence[float] | np.ndarray,
        k: int,
        *,
        allowed: Collection[str] | None = None,
    ) -> list[tuple[str, float]]:
        """Up to `k` (key, cosine) pairs, best first, ties by key; `allowed` restricts keys."""
        k = check_k(k)
        if len(self) == 0:
            return []
        if allowed is None:
            cand = np.flatnonzero(self._slots.live)
        else:
            slot_of = self._slots.slot_of
            cand = np.array(sorted({slot_of[a] for a in allowed if a in slot_of}), dtype=np.intp)
        sc = self._core.scores(self._query(query_vec), cand)
        top = rank_top(cand, sc, k, self._slots.keys)
        pos = {int(s): i for i, s in enumerate(cand)}
        return [(self._slots.keys[s], float(sc[pos[s]])) for s in top]
