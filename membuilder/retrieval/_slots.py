"""Slot bookkeeping shared by the indexes: string keys mapped to dense integer slots.

Slots are handed out in increasing order and never reused; removing a key only marks its slot
dead, so the numpy arrays aligned with slots stay valid without moving data. When dead slots
outnumber live ones, `compact` renumbers the live slots 0..n-1 (in their old order) and returns
the old slot of each new one so every aligned structure can be rebuilt in one gather.
"""

from __future__ import annotations

import numpy as np

# Compaction costs O(slots); waiting until dead > live (and at least this many) keeps it
# amortised O(1) per removal while bounding the wasted work of queries to 2x.
COMPACT_MIN_DEAD = 16


def grow(arr: np.ndarray, needed: int, fill=0) -> np.ndarray:
    """Return `arr` or a copy with capacity >= `needed` along axis 0 (capacity doubling)."""
    cap = arr.shape[0]
    if needed <= cap:
        return arr
    new_cap = max(needed, 2 * cap, 8)
    out = np.full((new_cap,) + arr.shape[1:], fill, dtype=arr.dtype)
    out[:cap] = arr
    return out


def check_key(key: object) -> str:
    if not isinstance(key, str) or not key:
        raise TypeError(f"index keys must be non-empty strings, got {key!r}")
    return key


def check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def rank_top(
    slots: np.ndarray,  # [m] candidate slots
    scores: np.ndarray,  # [m] their scores
    k: int,
    keys: list[str | None],
) -> list[int]:
    """The `k` best candidate slots by score descending, ties broken by key ascending.

    argpartition alone would cut a run of equal scores arbitrarily at the k-th place, so every
    candidate tied with the k-th score is kept and the exact order is settled by a small sort.
    """
    m = len(slots)
    if m == 0:
        return []
    if m > k:
        kth = np.partition(scores, m - k)[m - k]
        keep = np.flatnonzero(scores >= kth)
        slots, scores = slots[keep], scores[keep]
    order = sorted(range(len(slots)), key=lambda i: (-scores[i], keys[slots[i]]))
    return [int(slots[i]) for i in order[:k]]


class SlotMap:
    """Keys <-> slots with a live mask. Not thread-safe; owners serialise access."""

    def __init__(self) -> None:
        self.keys: list[str | None] = []
        self.slot_of: dict[str, int] = {}
        self._live = np.zeros(0, dtype=bool)

    @property
    def n_slots(self) -> int:
        return len(self.keys)

    @property
    def n_live(self) -> int:
        return len(self.slot_of)

    @property
    def live(self) -> np.ndarray:  # [n_slots] bool view
        return self._live[: self.n_slots]

    def check_new(self, keys: list[str]) -> None:
        """Raise unless `keys` are distinct non-empty strings not yet indexed."""
        for key in keys:
            check_key(key)
        if len(set(keys)) != len(keys):
            raise ValueError("duplicate keys in one bulk insert")
        clash = [k for k in keys if k in self.slot_of]
        if clash:
            raise ValueError(f"keys already indexed (remove them first): {clash[:5]}")

    def allocate_many(self, keys: list[str]) -> int:
        """Allocate consecutive slots for new, distinct keys; returns the first slot."""
        self.check_new(keys)
        start = len(self.keys)
        self._live = grow(self._live, start + len(keys), False)
        self._live[start : start + len(keys)] = True
        self.keys.extend(keys)
        self.slot_of.update(zip(keys, range(start, start + len(keys))))
        return start

    def free(self, key: str) -> int:
        try:
            slot = self.slot_of.pop(key)
        except KeyError:
            raise KeyError(f"key {key!r} is not in the index") from None
        self._live[slot] = False
        self.keys[slot] = None
        return slot

    def should_compact(self) -> bool:
        dead = self.n_slots - self.n_live
        return dead >= COMPACT_MIN_DEAD and dead > self.n_live

    def compact(self) -> np.ndarray:
        """Renumber live slots densely; returns `order` with order[new_slot] = old_slot."""
        order = np.flatnonzero(self.live)
        self.keys = [self.keys[i] for i in order]
        self.slot_of = {k: i for i, k in enumerate(self.keys)}
        self._live = np.ones(len(self.keys), dtype=bool)
        return order

    def clear(self) -> None:
        self.keys = []
        self.slot_of = {}
        self._live = np.zeros(0, dtype=bool)
