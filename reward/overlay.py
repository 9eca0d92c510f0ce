"""Copy-on-write candidate banks over a shared state-before base.

Scoring G candidates of a session used to mean G full banks: restore the state before, apply the
candidate's operations, rebuild BM25 and the dense index over every entry. Here the state before
is loaded once into a `BaseBank` (entries, BM25 statistics and postings, unit embeddings), shared
read-only by every candidate and thread; a candidate is an `OverlayStore` holding only its new,
updated and retired entries, driven by an ordinary `MemoryBank` (so the operation semantics and
`apply_agent_outputs` are the library's own), and searched by `CandidateSearch`.

Exactness. `CandidateSearch.search` returns what `MemoryBank.search` returns on a bank rebuilt
from the same state and operations (same entries, same order, same ranks; `HybridIndex`'s
rules): BM25 is scored with the statistics of the merged corpus (base minus the entries the
candidate changed or retired, plus its new versions), not of the base: N, the average document
length, each query term's document frequency, and, when a query term's idf is negative, the mean
idf over every term of the merged corpus (BM25Okapi's epsilon floor), all computed from the
base's counts plus the candidate's delta. The float expressions and the order of additions are
those of `membuilder.retrieval.bm25.BM25Core`, so scores agree to the last bits (the floor's mean
is summed in another term order, which can move it by an ulp). The dense list ranks base rows by
cached cosine (the same for every candidate) merged with the candidate's own rows; fusion is RRF
with HybridIndex's constants and tie rule (score, then key).
"""

from __future__ import annotations

import math
import threading
from collections import Counter, OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterable, Iterator, Sequence

import numpy as np

from membuilder.bank import MAX_QUERY_CHARS, SearchResult
from membuilder.retrieval import HybridIndex, tokenize
from membuilder.retrieval.bm25 import BM25Core
from membuilder.retrieval.dense import as_unit_rows, as_vector
from membuilder.types import (
    BankState,
    HistoryRecord,
    InvalidInputError,
    MemoryEntry,
    MemoryKind,
    OwnerMeta,
    Status,
    StoreError,
)
from membuilder.store import id_order, undo_log

_DEFAULTS = BM25Core()  # the bank's BM25 parameters (k1, b, epsilon)
_HYBRID = HybridIndex()  # the bank's fusion parameters (rrf_k, pool)
K1, B, EPSILON = _DEFAULTS.k1, _DEFAULTS.b, _DEFAULTS.epsilon
RRF_K, POOL = _HYBRID.rrf_k, _HYBRID.pool


def _reowned(entry, owner: str):
    return entry if entry.owner == owner else replace(entry, owner=owner)


class BaseBank:
    """The state before a session, loaded once: read-only, shared by candidates and threads.

    `owner` is the owner every candidate searches under (the request's); the state's entries are
    re-owned to it exactly as `MemoryStore.restore(state, owner=owner)` does. With an embedder,
    the stored embeddings are used when the state says this embedder wrote them, else every
    active entry is embedded once here (what `MemoryBank` does on its first search).
    """

    def __init__(self, state: BankState, owner: str, embedder=None, *, query_cache: int = 256):
        if not isinstance(state, BankState):
            raise InvalidInputError(f"BaseBank takes a BankState, got {type(state).__name__}")
        self.owner = owner
        self.embedder = embedder
        self.meta = state.meta
        self.entries: dict[str, MemoryEntry] = {e.id: _reowned(e, owner) for e in state.entries}
        self.history = tuple(_reowned(h, owner) for h in state.history)
        stored = {k: np.frombuffer(v, dtype=np.float32) for k, v in state.embeddings}
        self.stored_embeddings = stored
        live = sorted((e for e in self.entries.values() if e.status is Status.ACTIVE), key=lambda e: id_order(e.id))
        self.keys: list[str] = [e.id for e in live]
        self.slot_of = {k: i for i, k in enumerate(self.keys)}
        self.kind_code = np.array([_KIND_CODE[e.kind] for e in live], dtype=np.int8)
        # BM25, vectorised: one (term, doc) pair per distinct term of a doc with its tf, sorted by
        # term then doc, gives every posting list as a slice; a second order by doc gives each
        # doc's distinct terms (what a removal subtracts from the document frequencies).
        token_lists = [tokenize(e.text) for e in live]
        term_index: dict[str, int] = {}
        flat = [term_index.setdefault(t, len(term_index)) for tokens in token_lists for t in tokens]
        n, n_terms = len(live), len(term_index)
        self.doc_len = np.asarray([len(t) for t in token_lists], dtype=np.int64)
        doc_of = np.repeat(np.arange(n, dtype=np.int64), self.doc_len)
        pair, tf = np.unique(np.asarray(flat, dtype=np.int64) * max(n, 1) + doc_of, return_counts=True)
        p_term, p_doc = pair // max(n, 1), pair % max(n, 1)
        self._p_doc = p_doc.astype(np.intp)
        self._p_tf = tf.astype(np.float64)
        self.df_array = np.bincount(p_term, minlength=n_terms).astype(np.int64)  # [terms]
        self._p_start = np.concatenate([[0], np.cumsum(self.df_array)])
        by_doc = np.lexsort((p_term, p_doc))
        self._d_term = p_term[by_doc]
        self._d_start = np.concatenate([[0], np.cumsum(np.bincount(p_doc, minlength=n))]).astype(np.int64)
        self.terms = list(term_index)  # term order of `df_array`
        self.term_index = term_index
        self.n_docs = len(live)
        self.total_len = int(self.doc_len.sum()) if live else 0
        # dense
        self.unit: np.ndarray | None = None  # [n, dim] unit rows, or None without an embedder
        if embedder is not None and live:
            if state.meta.embedder == embedder.name and all(k in stored for k in self.keys):
                vecs = np.stack([stored[k] for k in self.keys])
            else:
                vecs = np.asarray(embedder.embed([e.text for e in live]), dtype=np.float32)
            self.unit = as_unit_rows(vecs, None)
        self._key_order = np.asarray(sorted(range(len(self.keys)), key=self.keys.__getitem__), dtype=np.intp)
        self._lock = threading.Lock()
        self._queries: OrderedDict[str, tuple] = OrderedDict()  # text -> query()'s result
        self._query_cache = query_cache

    def __len__(self) -> int:
        return self.n_docs

    def df(self, term: str) -> int:
        """Base documents containing `term`."""
        i = self.term_index.get(term)
        return 0 if i is None else int(self.df_array[i])

    def postings(self, term: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(slots, tf as float64) of the base documents containing `term`, slots ascending."""
        i = self.term_index.get(term)
        if i is None:
            return None
        a, b = self._p_start[i], self._p_start[i + 1]
        return self._p_doc[a:b], self._p_tf[a:b]

    def doc_terms(self, slot: int) -> list[str]:
        """The distinct terms of one base document."""
        a, b = self._d_start[slot], self._d_start[slot + 1]
        return [self.terms[t] for t in self._d_term[a:b]]

    def query(self, text: str) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """(query unit vector or None, base slots ordered by cosine desc then key, cosines) for
        `text`: the same for every candidate, so computed once and cached (LRU)."""
        empty = np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.float32)
        if self.embedder is None:
            return (None, *empty)
        with self._lock:
            hit = self._queries.get(text)
            if hit is not None:
                self._queries.move_to_end(text)
                return hit
        vec = np.asarray(self.embedder.embed([text[:MAX_QUERY_CHARS]]), dtype=np.float32)[0]
        unit = as_unit_rows(as_vector(vec, "query_embedding")[None, :], None, "query_embedding")[0]
        if not unit.any():
            out = (None, *empty)
        elif self.unit is None:
            out = (unit, *empty)
        else:
            scores = np.einsum("ij,j->i", self.unit, unit)
            # ties by key: order the slots by key once, then a stable sort on -score
            order = self._key_order[np.argsort(-scores[self._key_order], kind="stable")]
            out = (unit, order, scores)
        with self._lock:
            self._queries[text] = out
            while len(self._queries) > self._query_cache:
                self._queries.popitem(last=False)
        return out


_KIND_CODE = {MemoryKind.EPISODIC: 0, MemoryKind.SEMANTIC: 1, MemoryKind.PROCEDURAL: 2}


class OverlayStore:
    """A `MemoryStore` of one owner: a `BaseBank` plus this candidate's writes (copy-on-write).

    Reads see the delta over the base; writes go to the delta only, inside `transaction()` (a
    failed transaction undoes exactly its writes). The base's vectors carry the label of the
    state's embedder (`meta.embedder`), as a restored store's would. One overlay per candidate:
    not thread-safe.
    """

    readonly = False

    def __init__(self, base: BaseBank):
        self.base = base
        self.owner = base.owner
        self.meta: OwnerMeta = base.meta
        self.delta: dict[str, MemoryEntry] = {}
        self.delta_embeddings: dict[str, tuple[np.ndarray, str | None] | None] = {}
        self.new_history: list[HistoryRecord] = []
        self._undo: list | None = None

    def _check(self, owner: str) -> None:
        if owner != self.owner:
            raise StoreError(f"this overlay holds owner {self.owner!r} only, not {owner!r}")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with undo_log(self):
            yield

    @contextmanager
    def reading(self) -> Iterator[None]:
        yield  # one thread per overlay: every read already sees one state

    def _write(self, undo) -> None:
        if self._undo is None:
            raise StoreError("store writes must happen inside store.transaction()")
        self._undo.append(undo)

    def owners(self) -> list[str]:
        return [self.owner]

    def get_meta(self, owner: str) -> OwnerMeta:
        return self.meta if owner == self.owner else OwnerMeta()

    def set_meta(self, owner: str, meta: OwnerMeta) -> None:
        self._check(owner)
        old = self.meta
        self.meta = meta
        self._write(lambda: setattr(self, "meta", old))

    def set_embedder(self, owner: str, embedder: str | None) -> None:
        self.set_meta(owner, replace(self.get_meta(owner), embedder=embedder))

    def _put_vector(self, entry_id: str, value) -> None:
        had, old = entry_id in self.delta_embeddings, self.delta_embeddings.get(entry_id)
        self.delta_embeddings[entry_id] = value

        def undo():
            if had:
                self.delta_embeddings[entry_id] = old
            else:
                self.delta_embeddings.pop(entry_id, None)
        self._write(undo)

    def insert_entries(self, entries: list[MemoryEntry], embeddings: list, embedder: str | None = None) -> None:
        for entry in entries:
            if entry.owner == self.owner and self.get_entry(self.owner, entry.id) is not None:
                raise StoreError(f"entry {entry.id!r} of owner {entry.owner!r} exists already; refusing to overwrite it")
        self.put_entries(entries, embeddings, embedder)

    def put_entries(self, entries: list[MemoryEntry], embeddings: list, embedder: str | None = None) -> None:
        for entry, vec in zip(entries, embeddings, strict=True):
            self._check(entry.owner)
            had, old = entry.id in self.delta, self.delta.get(entry.id)
            self.delta[entry.id] = entry

            def undo(i=entry.id, had=had, old=old):
                if had:
                    self.delta[i] = old
                else:
                    self.delta.pop(i, None)
            self._write(undo)
            self._put_vector(entry.id, None if vec is None else (np.array(vec, dtype=np.float32), embedder))

    def put_embeddings(self, owner: str, items, embedder: str) -> int:
        written = 0
        for entry_id, text, vec in items:
            entry = self.get_entry(owner, entry_id)
            if entry is None or entry.text != text or entry.status is not Status.ACTIVE:
                continue
            self._put_vector(entry_id, (np.array(vec, dtype=np.float32), embedder))
            written += 1
        return written

    def get_entry(self, owner: str, entry_id: str) -> MemoryEntry | None:
        if owner != self.owner:
            return None
        return self.delta.get(entry_id) or self.base.entries.get(entry_id)

    def list_entries(self, owner, kind=None, status=None) -> list[MemoryEntry]:
        if owner != self.owner:
            return []
        merged = {**self.base.entries, **self.delta}
        out = [e for e in merged.values()
               if (kind is None or e.kind == kind) and (status is None or e.status == status)]
        out.sort(key=lambda e: id_order(e.id))
        return out

    def load_embeddings(self, owner: str, embedder: str | None = None) -> dict[str, np.ndarray]:
        """id -> vector; with `embedder`, only that model's vectors."""
        if owner != self.owner:
            return {}
        out = {}
        if embedder is None or embedder == self.base.meta.embedder:
            out = {k: v.copy() for k, v in self.base.stored_embeddings.items() if k not in self.delta_embeddings}
        for k, value in self.delta_embeddings.items():
            if value is not None and (embedder is None or value[1] == embedder):
                out[k] = value[0].copy()
        return out

    def delta_vector(self, entry_id: str) -> np.ndarray | None:
        value = self.delta_embeddings.get(entry_id)
        return None if value is None else value[0]

    def append_history(self, records: list[HistoryRecord]) -> None:
        for rec in records:
            self._check(rec.owner)
            self.new_history.append(rec)
            self._write(lambda: self.new_history.pop())

    def history(self, owner: str, entry_id: str | None = None) -> list[HistoryRecord]:
        if owner != self.owner:
            return []
        return [h for h in (*self.base.history, *self.new_history) if entry_id is None or h.entry_id == entry_id]

    def snapshot(self, owner: str) -> BankState:
        """The candidate's whole state (as `MemoryStore.snapshot`: the vectors of the owner's embedder)."""
        self._check(owner)
        vecs = self.load_embeddings(owner, embedder=self.meta.embedder) if self.meta.embedder else {}
        return BankState(owner=owner, meta=self.meta, entries=tuple(self.list_entries(owner)),
                         embeddings=tuple(sorted((k, np.asarray(v, np.float32).tobytes()) for k, v in vecs.items())),
                         history=tuple(self.history(owner)))

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class _Doc:
    entry: MemoryEntry
    terms: Counter
    length: int
    unit: np.ndarray | None


class CandidateSearch:
    """Search over base + one candidate's delta, equal to a rebuilt bank's `search` (module doc).

    Build it after the candidate's operations are applied to its `OverlayStore`; it reads the
    delta once. Not thread-safe (one per candidate).
    """

    def __init__(self, store: OverlayStore):
        base = self.base = store.base
        self.core = store.meta.core
        removed = [base.slot_of[i] for i in store.delta if i in base.slot_of]
        self.removed = np.asarray(sorted(removed), dtype=np.intp)
        self._removed_set = set(removed)
        docs = []
        for entry in store.delta.values():
            if entry.status is not Status.ACTIVE:
                continue
            tokens = tokenize(entry.text)
            vec = store.delta_vector(entry.id)
            unit = None if vec is None else as_unit_rows(vec[None, :], None)[0]
            docs.append(_Doc(entry, Counter(tokens), len(tokens), unit))
        self.docs = docs
        if base.unit is not None and any(d.unit is None for d in docs):
            raise InvalidInputError("the base has embeddings but a candidate entry has none (embedder mismatch)")
        # merged statistics: base minus removed docs plus the candidate's docs
        self.df_delta: Counter = Counter()
        len_delta = 0
        for slot in removed:
            self.df_delta.subtract(base.doc_terms(slot))
            len_delta -= int(base.doc_len[slot])
        for d in docs:
            self.df_delta.update(d.terms.keys())
            len_delta += d.length
        self.n_docs = base.n_docs - len(removed) + len(docs)
        self.total_len = base.total_len + len_delta
        self._avg_idf: float | None = None

    def __len__(self) -> int:
        return self.n_docs

    # ---- BM25 on the merged corpus ----------------------------------------------------------

    def _df(self, term: str) -> int:
        return self.base.df(term) + self.df_delta.get(term, 0)

    def _average_idf(self) -> float:
        if self._avg_idf is None:
            df = self.base.df_array.copy()
            extra = []
            for term, change in self.df_delta.items():
                i = self.base.term_index.get(term)
                if i is None:
                    extra.append(change)
                else:
                    df[i] += change
            df = np.concatenate([df, np.asarray(extra, dtype=np.int64)])
            df = df[df > 0].astype(np.float64)
            n = float(self.n_docs)
            raw = np.log(n - df + 0.5) - np.log(df + 0.5)
            self._avg_idf = float(raw.sum()) / len(df)
        return self._avg_idf

    def _idf(self, term: str) -> float:
        n = self._df(term)
        if n == 0:
            return 0.0
        raw = math.log(self.n_docs - n + 0.5) - math.log(n + 0.5)
        return EPSILON * self._average_idf() if raw < 0 else raw

    def _bm25(self, query_tokens: Sequence[str]):
        """(base scores [n_base], base matched [n_base] bool, delta scores, delta matched)."""
        base = self.base
        out = np.zeros(base.n_docs)
        matched = np.zeros(base.n_docs, dtype=bool)
        d_out = [0.0] * len(self.docs)
        d_matched = [False] * len(self.docs)
        if self.n_docs == 0 or self.total_len == 0:
            return out, matched, d_out, d_matched
        avgdl = self.total_len / self.n_docs
        k1p1 = K1 + 1
        done: dict[str, tuple | None] = {}
        for term in query_tokens:
            if term not in done:
                if self._df(term) <= 0:
                    done[term] = None
                else:
                    idf = self._idf(term)
                    hit = base.postings(term)
                    contrib = None
                    if hit is not None:
                        slots, tf = hit
                        norm = K1 * (1 - B + B * base.doc_len[slots] / avgdl)
                        contrib = (slots, idf * (tf * k1p1 / (tf + norm)))
                        matched[slots] = True
                    d_contrib = []
                    for j, d in enumerate(self.docs):
                        tf = d.terms.get(term)
                        if tf:
                            norm = K1 * (1 - B + B * np.int64(d.length) / avgdl)
                            d_contrib.append((j, idf * (np.float64(tf) * k1p1 / (np.float64(tf) + norm))))
                            d_matched[j] = True
                    done[term] = (contrib, d_contrib)
            hit = done[term]
            if hit is not None:
                contrib, d_contrib = hit
                if contrib is not None:
                    out[contrib[0]] += contrib[1]
                for j, value in d_contrib:
                    d_out[j] = float(np.float64(d_out[j]) + value)
        return out, matched, d_out, d_matched

    # ---- search -------------------------------------------------------------------------------

    def search(self, query: str, *, k: int = 10,
               kinds: Iterable[MemoryKind | str] | None = None) -> list[SearchResult]:
        """Top-`k` active entries for `query` (optionally of `kinds`), as `MemoryBank.search`."""
        if not isinstance(query, str):
            raise InvalidInputError(f"query must be a string, got {type(query).__name__}")
        if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
            raise InvalidInputError(f"k must be a positive integer, got {k!r}")
        wanted = None
        if kinds is not None:
            parsed = [MemoryKind.parse(x) for x in ([kinds] if isinstance(kinds, (str, MemoryKind)) else kinds)]
            if MemoryKind.CORE in parsed:
                raise InvalidInputError("core memory is not searchable (read `core`)")
            wanted = {_KIND_CODE[x] for x in parsed}
        if self.n_docs == 0:
            return []
        base = self.base
        live = np.ones(base.n_docs, dtype=bool)
        live[self.removed] = False
        if wanted is not None and len(wanted) < 3:
            live &= np.isin(base.kind_code, list(wanted))
        d_live = [wanted is None or _KIND_CODE[d.entry.kind] in wanted for d in self.docs]
        if not live.any() and not any(d_live):
            return []
        pool = max(POOL, k)
        keys = base.keys
        # BM25 list over entries containing a query term
        scores, matched, d_scores, d_matched = self._bm25(tokenize(query))
        cand = np.flatnonzero(matched & live)
        ranked = [(float(scores[i]), keys[i], ("b", int(i))) for i in _preselect(cand, scores[cand], pool)]
        ranked += [(d_scores[j], d.entry.id, ("d", j)) for j, d in enumerate(self.docs) if d_matched[j] and d_live[j]]
        lists = [_top(ranked, pool)]
        # dense list over every live entry
        q_unit, order, cos = base.query(query)
        if q_unit is not None and (base.unit is not None or self.docs):
            dense: list = []
            for i in order:
                if live[i]:
                    dense.append((float(cos[i]), keys[i], ("b", int(i))))
                    if len(dense) == pool:
                        break
            mine = [j for j, d in enumerate(self.docs) if d_live[j]]
            if mine:
                mat = np.stack([self.docs[j].unit for j in mine])
                d_cos = np.einsum("ij,j->i", mat, q_unit)  # the bank's expression, row by row
                dense += [(float(c), self.docs[j].entry.id, ("d", j)) for j, c in zip(mine, d_cos)]
            lists.append(_top(dense, pool))
        ranks: dict[tuple, list] = {}
        for which, ranked_list in enumerate(lists):
            for rank, (_, key, ref) in enumerate(ranked_list, start=1):
                ranks.setdefault((key, ref), [None, None])[which] = rank
        fused = [(sum(1.0 / (RRF_K + r) for r in rs if r is not None), key, ref, rs)
                 for (key, ref), rs in ranks.items()]
        fused.sort(key=lambda item: (-item[0], item[1]))
        out = []
        for score, key, ref, rs in fused[:k]:
            entry = base.entries[key] if ref[0] == "b" else self.docs[ref[1]].entry
            out.append(SearchResult(entry, score, rs[0], rs[1]))
        return out


def _preselect(cand: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """The candidates that can be among the k best: all with a score >= the k-th best (ties kept)."""
    if len(cand) <= k:
        return cand
    kth = np.partition(scores, len(cand) - k)[len(cand) - k]
    return cand[scores >= kth]


def _top(items: list[tuple[float, str, tuple]], k: int) -> list[tuple[float, str, tuple]]:
    """The k best by score descending, ties by key ascending (HybridIndex's `rank_top` rule)."""
    items.sort(key=lambda x: (-x[0], x[1]))
    return items[:k]
