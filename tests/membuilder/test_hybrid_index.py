"""HybridIndex: exact kind / time filtering, hand-checked RRF fusion, upsert / remove
consistency, the pure-BM25 fallback, and the all-or-none embedding rule."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rank_bm25 import BM25Okapi

from membuilder.retrieval import KINDS, BM25Index, DenseIndex, Hit, HybridIndex, tokenize
from membuilder.retrieval import _slots as slots_module
from membuilder.retrieval._slots import COMPACT_MIN_DEAD


def test_rrf_fusion_hand_checked():
    index = HybridIndex(rrf_k=60, pool=50)
    # BM25 for "apple pie": A has both terms, B only "apple", C neither -> ranks A 1, B 2.
    # (N = 3: pie idf log(2.5 / 1.5) > 0; apple idf log(1.5 / 2.5) < 0 is floored to
    # 0.25 * mean idf = 0.25 * 4 log(5/3) / 6 > 0, so B scores > 0 too.)
    # Dense against q = [0, 1]: cos A 0, B 1, C 0.8 -> ranks B 1, C 2, A 3.
    index.upsert("A", "red apple pie", kind="episodic", embedding=[1.0, 0.0])
    index.upsert("B", "green apple", kind="semantic", embedding=[0.0, 2.0])  # normalised
    index.upsert("C", "blue sky", kind="procedural", embedding=[0.6, 0.8])
    hits = index.search("apple pie", k=3, query_embedding=[0.0, 1.0])
    # fused: B 1/62 + 1/61 = 0.032525 > A 1/61 + 1/63 = 0.032266 > C 1/62 = 0.016129
    assert hits == [
        Hit("B", 1 / 62 + 1 / 61, bm25_rank=2, dense_rank=1),
        Hit("A", 1 / 61 + 1 / 63, bm25_rank=1, dense_rank=3),
        Hit("C", 1 / 62, bm25_rank=None, dense_rank=2),
    ]
    # k cuts the fused list; a kind filter removes A from both lists, so B and C move up.
    assert [h.key for h in index.search("apple pie", k=1, query_embedding=[0, 1])] == ["B"]
    hits = index.search("apple pie", kinds=["semantic", "procedural"], query_embedding=[0, 1])
    assert hits == [
        Hit("B", 1 / 61 + 1 / 61, bm25_rank=1, dense_rank=1),
        Hit("C", 1 / 62, bm25_rank=None, dense_rank=2),
    ]


def test_pure_bm25_fallback_matches_bm25_ranking():
    texts = {
        "e1": "we went hiking in the mountains",
        "e2": "hiking boots and a tent for the mountains trip",
        "e3": "my sister adopted a cat",
        "e4": "the cat sleeps all day",
        "e5": "a recipe for apple pie",
    }
    plain = HybridIndex()
    with_emb = HybridIndex()
    bm25 = BM25Index()
    rng = np.random.default_rng(0)
    for key, text in texts.items():
        plain.upsert(key, text, kind="episodic")
        with_emb.upsert(key, text, kind="episodic", embedding=rng.standard_normal(4))
        bm25.add(key, tokenize(text))
    query = "mountains hiking cat"
    expected = [k for k, _ in bm25.top_k(tokenize(query), 10)]
    assert expected[:2] == ["e1", "e2"]  # the shorter hiking doc first
    for index in (plain, with_emb):
        # Without embeddings, or without a query embedding, the fused order is the BM25 order
        # and each hit's score is 1 / (60 + its BM25 rank).
        hits = index.search(query, k=10)
        assert [h.key for h in hits] == expected
        assert [h.bm25_rank for h in hits] == list(range(1, len(expected) + 1))
        assert all(h.dense_rank is None for h in hits)
        assert [h.score for h in hits] == [1 / (60 + r) for r in range(1, len(expected) + 1)]
    # A query embedding sent to an index without embeddings is ignored.
    assert plain.search(query, query_embedding=[1.0, 2.0]) == plain.search(query)
    # A zero query embedding carries no direction and is ignored too.
    assert with_emb.search(query, query_embedding=np.zeros(4)) == with_emb.search(query)
    assert plain.search("nothing matches this", k=5) == []


def test_upsert_replace_remove_and_clear():
    index = HybridIndex()
    index.upsert("x", "alpha beta", kind="episodic", event_time=10.0)
    index.upsert("y", "gamma delta", kind="semantic")
    # Two entries: BM25Okapi gives "alpha" idf 0 here, yet the matching entry is returned.
    assert [h.key for h in index.search("alpha")] == ["x"]
    index.upsert("x", "gamma epsilon", kind="procedural", event_time=20.0)  # replaces x
    assert len(index) == 2 and set(index.keys()) == {"x", "y"}
    assert index.search("alpha") == []
    assert [h.key for h in index.search("epsilon", kinds=["procedural"])] == ["x"]
    assert index.search("epsilon", kinds=["episodic"]) == []
    assert [h.key for h in index.search("gamma", time_range=(15.0, None))] == ["x"]
    index.remove("x")
    assert "x" not in index and [h.key for h in index.search("gamma")] == ["y"]
    with pytest.raises(KeyError, match="not in the index"):
        index.remove("x")
    index.upsert_many(["y", "z"], ["zeta", "zeta eta"], ["semantic", "semantic"], [None, 5.0])
    # "zeta" is in both docs: raw idf log(0.5 / 2.5) < 0 is floored to 0.25 * mean idf =
    # 0.25 * (log(0.2) + 0) / 2 < 0, so the shorter doc y gets the more negative score.
    assert [h.key for h in index.search("zeta")] == ["z", "y"]
    index.clear()
    assert len(index) == 0 and index.search("zeta") == []


def test_embeddings_all_or_none_and_validation():
    index = HybridIndex()
    index.upsert("a", "one", kind="episodic", embedding=[1.0, 0.0, 0.0])
    assert index.has_embeddings and index.dim == 3
    with pytest.raises(ValueError, match="has embeddings"):
        index.upsert("b", "two", kind="episodic")
    with pytest.raises(ValueError, match="dimension 2"):
        index.upsert("b", "two", kind="episodic", embedding=[1.0, 0.0])
    with pytest.raises(ValueError, match="dimension 2"):
        index.search("one", query_embedding=[1.0, 0.0])
    with pytest.raises(ValueError, match="NaN"):
        index.upsert("b", "two", kind="episodic", embedding=[math.nan, 0.0, 1.0])
    # Replacing the only entry may change the choice; so may emptying the index.
    index.upsert("a", "one", kind="episodic")
    assert not index.has_embeddings
    index.remove("a")
    index.upsert("c", "three", kind="semantic", embedding=[0.0, 1.0])
    assert index.has_embeddings and index.dim == 2
    with pytest.raises(ValueError, match="unknown memory kind"):
        index.upsert("d", "four", kind="core")
    with pytest.raises(ValueError, match="unknown memory kind"):
        index.search("three", kinds=["semantic", "nope"])
    with pytest.raises(ValueError, match="kinds is empty"):
        index.search("three", kinds=[])
    with pytest.raises(ValueError, match="positive"):
        index.search("three", k=0)
    with pytest.raises(ValueError, match="after end"):
        index.search("three", time_range=(5.0, 1.0))
    with pytest.raises(ValueError, match="duplicate"):
        index.upsert_many(["e", "e"], ["x", "y"], ["semantic"] * 2, None, np.eye(2))
    with pytest.raises(ValueError, match="lengths differ"):
        index.upsert_many(["e", "f"], ["x"], ["semantic"] * 2)
    # A rejected batch changed nothing.
    assert index.keys() == ["c"]
    # A str (or str Enum) is accepted as a single kind.
    assert [h.key for h in index.search("three", kinds="semantic")] == ["c"]


def test_narrow_filter_dense_path_matches_dense_index():
    # With few entries passing the filter the dense scores are computed on the gathered rows
    # only; ranks must equal a plain DenseIndex restricted to the same keys.
    rng = np.random.default_rng(1)
    n = 200
    keys = [f"k{i:03d}" for i in range(n)]
    vecs = rng.standard_normal((n, 8)).astype(np.float32)
    kinds = ["semantic" if i % 20 == 0 else "episodic" for i in range(n)]
    index = HybridIndex(pool=50)
    index.upsert_many(keys, ["filler"] * n, kinds, [float(i) for i in range(n)], vecs)
    dense = DenseIndex()
    dense.add_many(keys, vecs)
    q = rng.standard_normal(8)
    allowed = {k for k, kind in zip(keys, kinds) if kind == "semantic"}
    hits = index.search("unmatched", k=20, kinds=["semantic"], query_embedding=q)
    expected = [k for k, _ in dense.top_k(q, 20, allowed=allowed)]
    assert [h.key for h in hits] == expected
    assert [h.dense_rank for h in hits] == list(range(1, 11))
    # Unfiltered: the full matvec path.
    hits = index.search("unmatched", k=50, query_embedding=q)
    assert [h.key for h in hits] == [k for k, _ in dense.top_k(q, 50)]


_WORDS = ["sun", "moon", "star", "rain", "snow"]
_entry = st.tuples(
    st.integers(0, 15),  # key
    st.lists(st.sampled_from(_WORDS), min_size=0, max_size=5),
    st.sampled_from(KINDS),
    st.one_of(st.none(), st.integers(0, 6).map(float)),
)
_ops = st.lists(st.tuples(st.booleans(), _entry), min_size=1, max_size=60)
_kinds = st.one_of(st.none(), st.sets(st.sampled_from(KINDS), min_size=1))
_bound = st.one_of(st.none(), st.integers(0, 6).map(float))
_range = st.one_of(st.none(), st.tuples(_bound, _bound))


def _passes(meta, kinds, time_range) -> bool:
    kind, t = meta
    if kinds is not None and kind not in kinds:
        return False
    if time_range is not None:
        lo, hi = time_range
        if t is None or (lo is not None and t < lo) or (hi is not None and t > hi):
            return False
    return True


def _apply(index, live, ops, embed):
    for is_upsert, (i, words, kind, t) in ops:
        key = f"k{i:02d}"
        vec = np.array([1.0 + i, (i * 7) % 5 - 2.0, 0.5], dtype=np.float32)
        if is_upsert:
            index.upsert(key, " ".join(words), kind=kind, event_time=t,
                         embedding=vec if embed else None)
            live[key] = (words, kind, t, vec)
        elif key in live:
            index.remove(key)
            del live[key]


@settings(max_examples=120, deadline=None)
@given(
    ops=_ops,
    query=st.lists(st.sampled_from(_WORDS + ["cloud"]), min_size=1, max_size=3),
    kinds=_kinds,
    time_range=_range,
    embed=st.booleans(),
)
def test_filters_and_ranking_against_brute_force(ops, query, kinds, time_range, embed):
    if time_range is not None and None not in time_range and time_range[0] > time_range[1]:
        time_range = (time_range[1], time_range[0])
    index = HybridIndex(pool=100)  # pool above the corpus size: every candidate is ranked
    live: dict[str, tuple[list[str], str, float | None, np.ndarray]] = {}
    with pytest.MonkeyPatch.context() as mp:
        # Compact after a few dead slots so that random edits exercise compaction.
        mp.setattr(slots_module, "COMPACT_MIN_DEAD", 2)
        _apply(index, live, ops, embed)
    assert sorted(index.keys()) == sorted(live)
    q_vec = np.array([0.3, -1.0, 2.0]) if embed else None
    hits = index.search(" ".join(query), k=100, kinds=kinds, time_range=time_range,
                        query_embedding=q_vec)
    passing = sorted(k for k, v in live.items() if _passes(v[1:3], kinds, time_range))

    # BM25 statistics come from every live entry; the filter only restricts candidates.
    keys = sorted(live)
    if any(live[k][0] for k in keys):
        ref = dict(zip(keys, BM25Okapi([live[k][0] for k in keys]).get_scores(query)))
    else:
        ref = dict.fromkeys(keys, 0.0)
    bm25_hits = sorted((h for h in hits if h.bm25_rank is not None), key=lambda h: h.bm25_rank)
    matching = [k for k in passing if set(query) & set(live[k][0])]
    assert sorted(h.key for h in bm25_hits) == matching
    for a, b in zip(bm25_hits, bm25_hits[1:]):
        assert ref[a.key] >= ref[b.key] - 1e-9
        if abs(ref[a.key] - ref[b.key]) <= 1e-12:
            assert a.key < b.key
    if embed:
        # Every passing entry is in the dense list, ranked by cosine then key.
        qn = q_vec / np.linalg.norm(q_vec)
        cos = {k: float(live[k][3] @ qn / np.linalg.norm(live[k][3])) for k in passing}
        dense_hits = sorted(hits, key=lambda h: h.dense_rank)
        assert sorted(h.key for h in dense_hits) == passing
        assert [h.dense_rank for h in dense_hits] == list(range(1, len(passing) + 1))
        ordered = [cos[h.key] for h in dense_hits]  # float64 reference vs float32 index
        assert all(a >= b - 1e-6 for a, b in zip(ordered, ordered[1:]))
    else:
        assert all(h.dense_rank is None for h in hits)
        assert {h.key for h in hits} == {h.key for h in bm25_hits}
    # Fused scores and their order.
    for h in hits:
        expect = sum(1 / (60 + r) for r in (h.bm25_rank, h.dense_rank) if r is not None)
        assert h.score == pytest.approx(expect, rel=1e-12)
    assert hits == sorted(hits, key=lambda h: (-h.score, h.key))


def test_compaction_keeps_metadata_aligned():
    index = HybridIndex()
    n = 6 * COMPACT_MIN_DEAD
    keys = [f"k{i:03d}" for i in range(n)]
    kinds = [KINDS[i % 3] for i in range(n)]
    times = [float(i) for i in range(n)]
    vecs = np.eye(n, dtype=np.float32)[:, :8] + 0.01
    index.upsert_many(keys, [f"word{i % 5} shared" for i in range(n)], kinds, times, vecs)
    removed = set(keys[: n - 10])
    for key in sorted(removed):
        index.remove(key)
    assert index._slots.n_slots < n  # compacted
    hits = index.search("shared", k=50, kinds=["semantic"], time_range=(n - 8.0, None),
                        query_embedding=np.ones(8))
    expected = {k for i, k in enumerate(keys) if k not in removed and kinds[i] == "semantic"
                and times[i] >= n - 8}
    assert {h.key for h in hits} == expected and expected
