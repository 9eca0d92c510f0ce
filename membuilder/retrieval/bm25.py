"""Incremental Okapi BM25 that gives the same scores as `rank_bm25.BM25Okapi`.

Scoring, for a live corpus of N documents with average length avgdl (total tokens / N):

    score(d, q) = sum over query terms t, repeats counted each time, of
                  idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t) = log(N - n_t + 0.5) - log(n_t + 0.5)      (n_t = live documents containing t)

and an idf below zero (terms in more than half the documents) is replaced by
epsilon * (mean raw idf over every term of the live corpus). Terms absent from the live corpus
contribute nothing. These are rank_bm25 0.2.2's rules; contributions are added in query order
with the same float64 expression, so scores agree with it to the last few ulps.

Layout (for ~100k documents): per term a numpy posting list (slots, tf) that only grows, a
per-slot document length, the document's own (term id, tf) pairs in a flat CSR array so that a
removal can decrement document frequencies, and incremental document frequencies and total
length. A removal leaves the document's postings in place (its slot is dead and masked by the
caller); `compact` drops them once dead slots dominate. A query touches only the postings of its
terms, so it costs O(sum of their lengths), not O(N * |q|) as BM25Okapi does.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Collection, Iterable, Sequence

import numpy as np

from ._slots import SlotMap, check_k, grow, rank_top

_WORD = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    """Lowercased unicode word tokens (`\\w+`); the one tokenizer for BM25 documents and queries."""
    if not isinstance(text, str):
        raise TypeError(f"tokenize expects a str, got {type(text).__name__}")
    return _WORD.findall(text.lower())


def _check_tokens(tokens: object) -> Sequence[str]:
    if isinstance(tokens, str):
        raise TypeError("expected a sequence of tokens, got a str; call tokenize(text) first")
    return tokens  # type: ignore[return-value]


class BM25Core:
    """BM25 postings addressed by slot (0, 1, 2, ... in insertion order); no keys, no liveness.

    Used by `BM25Index` and `HybridIndex`, which own the key <-> slot map and mask dead slots.
    """

    def __init__(self, *, k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25) -> None:
        if not (math.isfinite(k1) and k1 >= 0):
            raise ValueError(f"k1 must be a finite number >= 0, got {k1!r}")
        if not (0.0 <= b <= 1.0):
            raise ValueError(f"b must lie in [0, 1], got {b!r}")
        if not math.isfinite(epsilon):
            raise ValueError(f"epsilon must be finite, got {epsilon!r}")
        self.k1, self.b, self.epsilon = float(k1), float(b), float(epsilon)
        self.clear()

    def clear(self) -> None:
        self.term_id: dict[str, int] = {}
        self._p_slots: list[np.ndarray] = []  # per term: [capacity] intp, first _p_n[t] valid
        self._p_tfs: list[np.ndarray] = []  # per term: [capacity] float64 term frequencies
        self._p_n: list[int] = []
        self._df = np.zeros(0, dtype=np.int64)  # [terms] live documents containing the term
        self._doc_len = np.zeros(0, dtype=np.int64)  # [slots]
        self._doc_ptr = np.zeros(0, dtype=np.int64)  # [slots] start of the doc in the flat arrays
        self._doc_cnt = np.zeros(0, dtype=np.int64)  # [slots] distinct terms of the doc
        self._flat_tids = np.zeros(0, dtype=np.int64)
        self._flat_tfs = np.zeros(0, dtype=np.int64)
        self._flat_n = 0
        self.n_slots = 0
        self.n_docs = 0  # live documents
        self.total_len = 0  # live tokens
        self._version = 0
        self._avg_idf = (-1, 0.0)  # (version, value)
        self._norm = np.zeros(0)  # [slots] k1 * (1 - b + b * len / avgdl)
        self._norm_avgdl = math.nan
        self._norm_upto = 0

    # ---- mutation -------------------------------------------------------------------------

    def add_docs(self, token_lists: Iterable[Sequence[str]]) -> None:
        """Append documents at slots n_slots, n_slots + 1, ..."""
        term_id = self.term_id
        n_terms = len(term_id)
        tids: list[int] = []
        tfs: list[int] = []
        counts: list[int] = []
        lens: list[int] = []
        try:
            for tokens in token_lists:
                bag = Counter(_check_tokens(tokens))
                for term, tf in bag.items():
                    tid = term_id.get(term)
                    if tid is None:
                        if not isinstance(term, str):
                            raise TypeError(f"tokens must be str, got {term!r}")
                        tid = term_id[term] = len(term_id)
                    tids.append(tid)
                    tfs.append(tf)
                counts.append(len(bag))
                lens.append(len(tokens))
        except TypeError:
            # Nothing else changed yet: forgetting the new terms undoes the call.
            for term in [t for t, i in term_id.items() if i >= n_terms]:
                del term_id[term]
            raise
        self._ingest(
            np.asarray(tids, dtype=np.int64),
            np.asarray(tfs, dtype=np.int64),
            np.asarray(counts, dtype=np.int64),
            np.asarray(lens, dtype=np.int64),
        )

    def _ingest(
        self,
        tids: np.ndarray,  # [m] term id of each (doc, distinct term) pair, docs in order
        tfs: np.ndarray,  # [m] its frequency in the doc
        counts: np.ndarray,  # [docs] distinct terms per doc
        lens: np.ndarray,  # [docs] tokens per doc
    ) -> None:
        n_new = len(counts)
        if n_new == 0:
            return
        first = self.n_slots
        end = first + n_new
        n_terms = len(self.term_id)
        while len(self._p_n) < n_terms:
            self._p_slots.append(np.zeros(0, dtype=np.intp))
            self._p_tfs.append(np.zeros(0, dtype=np.float64))
            self._p_n.append(0)
        self._df = grow(self._df, n_terms)
        for name in ("_doc_len", "_doc_ptr", "_doc_cnt"):
            setattr(self, name, grow(getattr(self, name), end))
        self._doc_len[first:end] = lens
        self._doc_cnt[first:end] = counts
        self._doc_ptr[first:end] = self._flat_n + np.cumsum(counts) - counts
        m = len(tids)
        self._flat_tids = grow(self._flat_tids, self._flat_n + m)
        self._flat_tfs = grow(self._flat_tfs, self._flat_n + m)
        self._flat_tids[self._flat_n : self._flat_n + m] = tids
        self._flat_tfs[self._flat_n : self._flat_n + m] = tfs
        self._flat_n += m

        # Group the new (term, slot, tf) triples by term; the stable sort keeps slots ascending
        # inside each group, so every posting list stays sorted by slot.
        doc_of = np.repeat(np.arange(first, end, dtype=np.intp), counts)
        order = np.argsort(tids, kind="stable")
        t_sorted = tids[order]
        s_sorted = doc_of[order]
        f_sorted = tfs[order].astype(np.float64)
        starts = np.flatnonzero(np.r_[True, t_sorted[1:] != t_sorted[:-1]]) if m else order
        bounds = np.r_[starts, m]
        uniq = t_sorted[starts]
        self._df[uniq] += np.diff(bounds)
        p_slots, p_tfs, p_n = self._p_slots, self._p_tfs, self._p_n
        for j, t in enumerate(uniq.tolist()):
            a, z = int(bounds[j]), int(bounds[j + 1])
            n = p_n[t]
            if n == 0:
                # Views into the sorted arrays: capacity == length, so the first later append
                # copies instead of writing past the view.
                p_slots[t] = s_sorted[a:z]
                p_tfs[t] = f_sorted[a:z]
            else:
                need = n + z - a
                if need > p_slots[t].shape[0]:
                    p_slots[t] = grow(p_slots[t], need)
                    p_tfs[t] = grow(p_tfs[t], need)
                p_slots[t][n:need] = s_sorted[a:z]
                p_tfs[t][n:need] = f_sorted[a:z]
            p_n[t] = n + z - a
        self.n_slots = end
        self.n_docs += n_new
        self.total_len += int(lens.sum())
        self._version += 1

    def remove_doc(self, slot: int) -> None:
        """Take a live document out of the statistics; its postings stay until `compact`."""
        a = int(self._doc_ptr[slot])
        tids = self._flat_tids[a : a + int(self._doc_cnt[slot])]
        self._df[tids] -= 1  # a doc lists each of its terms once
        self.n_docs -= 1
        self.total_len -= int(self._doc_len[slot])
        self._version += 1

    def compact(self, order: np.ndarray) -> None:
        """Keep only the slots in `order` (order[new_slot] = old_slot) and forget dead terms."""
        cnt = self._doc_cnt[order]
        ptr = self._doc_ptr[order]
        # Flat positions of every (term, tf) pair of the kept docs, in new slot order.
        pos = np.repeat(ptr - (np.cumsum(cnt) - cnt), cnt) + np.arange(int(cnt.sum()))
        old_tids = self._flat_tids[pos]
        tfs = self._flat_tfs[pos]
        lens = self._doc_len[order]
        live_terms = np.flatnonzero(self._df[: len(self.term_id)] > 0)
        remap = np.full(len(self.term_id), -1, dtype=np.int64)
        remap[live_terms] = np.arange(len(live_terms))
        names = list(self.term_id)
        term_id = {names[old]: new for new, old in enumerate(live_terms.tolist())}
        self.clear()
        self.term_id = term_id
        self._ingest(remap[old_tids], tfs, cnt, lens)

    # ---- scoring --------------------------------------------------------------------------

    def _norm_for(self, avgdl: float) -> np.ndarray:
        # Same float expression as BM25Okapi: k1 * (1 - b + b * doc_len / avgdl).
        if avgdl != self._norm_avgdl:
            self._norm_avgdl, self._norm_upto = avgdl, 0
        if self._norm_upto < self.n_slots:
            self._norm = grow(self._norm, self.n_slots)
            lo, hi = self._norm_upto, self.n_slots
            self._norm[lo:hi] = self.k1 * (1 - self.b + self.b * self._doc_len[lo:hi] / avgdl)
            self._norm_upto = hi
        return self._norm

    def _average_idf(self) -> float:
        if self._avg_idf[0] != self._version:
            df = self._df[: len(self.term_id)]
            df = df[df > 0].astype(np.float64)
            n = float(self.n_docs)
            raw = np.log(n - df + 0.5) - np.log(df + 0.5)
            self._avg_idf = (self._version, float(raw.sum()) / len(df))
        return self._avg_idf[1]

    def idf(self, term: str) -> float:
        """The idf BM25Okapi would use for `term` on the live corpus (0.0 if absent)."""
        tid = self.term_id.get(term)
        n = 0 if tid is None else int(self._df[tid])
        if n == 0:
            return 0.0
        raw = math.log(self.n_docs - n + 0.5) - math.log(n + 0.5)
        return self.epsilon * self._average_idf() if raw < 0 else raw

    def scores(
        self, query_tokens: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray]:  # [n_slots] float64, [n_slots] bool
        """Scores of every slot, dead ones included (callers mask them), and which slots
        contain at least one query term."""
        out = np.zeros(self.n_slots)
        matched = np.zeros(self.n_slots, dtype=bool)
        if self.n_docs == 0 or self.total_len == 0:
            return out, matched  # no live term (BM25Okapi itself cannot be built)
        norm = self._norm_for(self.total_len / self.n_docs)
        k1p1 = self.k1 + 1
        done: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}
        for term in _check_tokens(query_tokens):
            if term not in done:
                tid = self.term_id.get(term)
                if tid is None or self._df[tid] == 0:
                    done[term] = None
                else:
                    n = self._p_n[tid]
                    slots = self._p_slots[tid][:n]
                    tf = self._p_tfs[tid][:n]
                    done[term] = (slots, self.idf(term) * (tf * k1p1 / (tf + norm[slots])))
                    matched[slots] = True
            hit = done[term]
            if hit is not None:
                out[hit[0]] += hit[1]  # slots are unique within a posting list
        return out, matched


class BM25Index:
    """Okapi BM25 over a changing set of keyed documents, equal to `rank_bm25.BM25Okapi`.

    `add(key, tokens)` / `remove(key)`; an updated document is `remove` then `add`. Scores are
    those BM25Okapi gives when built on the live documents (in any order). Not thread-safe.
    """

    def __init__(self, *, k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25) -> None:
        self._core = BM25Core(k1=k1, b=b, epsilon=epsilon)
        self._slots = SlotMap()

    def __len__(self) -> int:
        return self._slots.n_live

    def __contains__(self, key: object) -> bool:
        return key in self._slots.slot_of

    def keys(self) -> list[str]:
        """Live keys in insertion order (the order of `get_scores`)."""
        return [k for k in self._slots.keys if k is not None]

    def add(self, key: str, tokens: Sequence[str]) -> None:
        """Index a new document; ValueError if `key` is already present."""
        self.add_many([key], [tokens])

    def add_many(self, keys: Sequence[str], token_lists: Sequence[Sequence[str]]) -> None:
        """Index many new documents at once (much faster than repeated `add`)."""
        keys = list(keys)
        token_lists = [_check_tokens(t) for t in token_lists]
        if len(keys) != len(token_lists):
            raise ValueError(f"{len(keys)} keys but {len(token_lists)} token lists")
        self._slots.check_new(keys)
        self._core.add_docs(token_lists)  # validates the tokens; changes nothing if they fail
        self._slots.allocate_many(keys)

    def remove(self, key: str) -> None:
        """Remove a document; KeyError if `key` is not indexed."""
        self._core.remove_doc(self._slots.free(key))
        if self._slots.should_compact():
            self._core.compact(self._slots.compact())

    def clear(self) -> None:
        self._core.clear()
        self._slots.clear()

    def idf(self, term: str) -> float:
        """idf of `term` on the live corpus, with BM25Okapi's epsilon floor (0.0 if absent)."""
        return self._core.idf(term)

    def get_scores(self, query_tokens: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """(live keys in insertion order, their float64 scores)."""
        scores, _ = self._core.scores(query_tokens)
        live = self._slots.live
        return self.keys(), scores[live]

    def top_k(
        self,
        query_tokens: Sequence[str],
        k: int,
        *,
        allowed: Collection[str] | None = None,
    ) -> list[tuple[str, float]]:
        """Up to `k` (key, score) pairs of documents containing a query term, best first, ties
        by key. `allowed` restricts the candidates to those keys (unknown keys are ignored).

        Matching, not score > 0, decides who is ranked: BM25Okapi's idf is 0 for a term in
        half the documents and negative (floored to epsilon * mean idf, itself negative when
        most terms are common) in tiny corpora, so with 1 or 2 documents nothing would ever
        score above 0.
        """
        k = check_k(k)
        scores, matched = self._core.scores(query_tokens)
        mask = self._slots.live & matched
        if allowed is not None:
            keep = np.zeros_like(mask)
            slot_of = self._slots.slot_of
            keep[[slot_of[a] for a in allowed if a in slot_of]] = True
            mask &= keep
        cand = np.flatnonzero(mask)
        top = rank_top(cand, scores[cand], k, self._slots.keys)
        return [(self._slots.keys[s], float(scores[s])) for s in top]
