"""BM25Index must give rank_bm25.BM25Okapi's scores on the live corpus, through removals and
re-adds, and rank deterministically."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rank_bm25 import BM25Okapi

from membuilder.retrieval import BM25Index, tokenize
from membuilder.retrieval import _slots as slots_module
from membuilder.retrieval._slots import COMPACT_MIN_DEAD

LOCOMO = Path("/work/shared/data/locomo/locomo10.json")


def assert_same_scores(index: BM25Index, live: dict[str, list[str]], query: list[str]) -> None:
    keys, scores = index.get_scores(query)
    assert sorted(keys) == sorted(live)
    if not any(live.values()):
        # BM25Okapi cannot be built on a corpus without a single token (it divides by the
        # vocabulary size); every score is 0 by definition.
        assert not scores.any()
        return
    ref = BM25Okapi([live[k] for k in keys]).get_scores(query)
    # Everything but the epsilon floor is the same float expression in the same order, so
    # equal to the bit; the floor's mean idf is a sum over the vocabulary whose order (and so
    # rounding) depends on the document order even inside rank_bm25. Hence a relative
    # tolerance plus an absolute one at the scale of the largest score.
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(scores, ref, rtol=1e-9, atol=1e-12 * scale)


def test_tokenize_lowercases_unicode_words():
    assert tokenize("Café déjà-vu, NAÏVE 42! x_y") == ["café", "déjà", "vu", "naïve", "42", "x_y"]
    assert tokenize("  ...  ") == []
    with pytest.raises(TypeError):
        tokenize(["not", "a", "string"])


def test_hand_worked_scores():
    # N = 4 docs, lengths 2, 2, 4, 2 -> avgdl = 10 / 4 = 2.5.
    # df: apple 3, pie 2, tart 1, juice 1, fresh 1, cherry 1.
    # raw idf = log(N - n + 0.5) - log(n + 0.5):
    #   apple log(1.5 / 3.5) = log(3/7) = -0.8473 (< 0, floored)
    #   pie   log(2.5 / 2.5) = 0        (not < 0, so NOT floored: stays 0)
    #   the four singletons log(3.5 / 1.5) = log(7/3) = 0.8473
    # mean raw idf = (log(3/7) + 0 + 4 log(7/3)) / 6 = log(7/3) / 2; floor = 0.25 * that.
    # norm(len) = k1 (1 - b + b len / avgdl): len 2 -> 1.5 (0.25 + 0.6) = 1.275,
    #                                        len 4 -> 1.5 (0.25 + 1.2) = 2.175.
    # tf part = tf (k1 + 1) / (tf + norm): tf 1, len 2 -> 2.5 / 2.275; tf 2, len 4 -> 5 / 4.175.
    docs = {
        "d1": ["apple", "pie"],
        "d2": ["apple", "tart"],
        "d3": ["apple", "apple", "juice", "fresh"],
        "d4": ["cherry", "pie"],
    }
    index = BM25Index()
    for key, tokens in docs.items():
        index.add(key, tokens)
    floor = 0.25 * math.log(7 / 3) / 2
    assert index.idf("apple") == pytest.approx(floor, rel=1e-12)
    assert index.idf("pie") == 0.0
    assert index.idf("tart") == pytest.approx(math.log(7 / 3), rel=1e-12)
    assert index.idf("unknown") == 0.0

    keys, scores = index.get_scores(["apple", "pie"])
    got = dict(zip(keys, scores))
    assert got["d1"] == pytest.approx(floor * 2.5 / 2.275, rel=1e-12)  # 0.11639
    assert got["d2"] == pytest.approx(floor * 2.5 / 2.275, rel=1e-12)
    assert got["d3"] == pytest.approx(floor * 5 / 4.175, rel=1e-12)  # 0.12684
    assert got["d4"] == 0.0  # pie's idf is 0
    # A repeated query term counts twice; an unknown one adds nothing.
    keys, scores = index.get_scores(["tart", "tart", "zebra"])
    assert dict(zip(keys, scores))["d2"] == pytest.approx(2 * math.log(7 / 3) * 2.5 / 2.275)
    assert_same_scores(index, docs, ["apple", "pie", "tart", "tart", "zebra"])
    # d3 > d1 = d2 (tie broken by key) > d4, which matches "pie" but scores 0.
    assert [k for k, _ in index.top_k(["apple", "pie"], 10)] == ["d3", "d1", "d2", "d4"]
    assert index.top_k(["zebra"], 10) == []


def test_tiny_corpus_still_ranks_matching_documents():
    # N = 2: a term in one doc has idf log(1.5 / 1.5) = 0, so every score is 0; top_k still
    # returns the documents that contain a query term.
    index = BM25Index()
    index.add("a", ["alpha", "beta"])
    index.add("b", ["gamma"])
    assert index.top_k(["alpha"], 5) == [("a", 0.0)]


def test_update_is_remove_then_add_and_errors_are_clear():
    index = BM25Index()
    index.add("a", ["red", "fox"])
    index.add("b", ["blue", "fox"])
    index.add("c", ["green", "frog"])
    with pytest.raises(ValueError, match="already indexed"):
        index.add("a", ["x"])
    with pytest.raises(KeyError, match="not in the index"):
        index.remove("zzz")
    with pytest.raises(TypeError, match="tokenize"):
        index.add("d", "a raw string")
    with pytest.raises(TypeError, match="tokens must be str"):
        index.add_many(["d", "e"], [["newterm"], ["ok", 3]])
    assert "d" not in index and len(index) == 3 and "newterm" not in index._core.term_id
    index.remove("a")
    index.add("a", ["red", "frog", "frog"])
    assert len(index) == 3 and "a" in index and "zzz" not in index
    live = {"a": ["red", "frog", "frog"], "b": ["blue", "fox"], "c": ["green", "frog"]}
    assert_same_scores(index, live, ["frog", "fox", "red"])
    with pytest.raises(ValueError, match="positive"):
        index.top_k(["frog"], 0)


def test_top_k_allowed_and_ties():
    index = BM25Index()
    index.add_many(["k3", "k1", "k2"], [["x", "y"]] * 3)
    index.add_many(["k4", "k5", "k6", "k7", "k8"], [["z"], ["w"], ["v"], ["u"], ["s"]])
    # k1..k3 share one score, positive since x is in 3 of 8 docs; ties go by key.
    assert [k for k, _ in index.top_k(["x"], 2)] == ["k1", "k2"]
    assert [k for k, _ in index.top_k(["x"], 5, allowed={"k3", "k4", "nope"})] == ["k3"]


def test_compaction_keeps_scores_exact():
    index = BM25Index()
    n = 4 * COMPACT_MIN_DEAD
    docs = {f"k{i:03d}": [f"t{i % 7}", f"t{i % 3}", "common"] * (1 + i % 2) for i in range(n)}
    index.add_many(list(docs), list(docs.values()))
    for i in range(0, n, 4):
        for j in (i, i + 1, i + 2):
            index.remove(f"k{j:03d}")
            del docs[f"k{j:03d}"]
    # 3/4 of the slots died, so a compaction ran: only live slots remain.
    assert index._slots.n_slots < n
    index.add("new", ["t1", "t1", "common"])
    docs["new"] = ["t1", "t1", "common"]
    assert_same_scores(index, docs, ["t1", "common", "t5", "t2"])


_VOCAB = ["a", "b", "c", "d", "e", "f"]
_docs = st.lists(st.sampled_from(_VOCAB), max_size=6)
_ops = st.lists(
    st.tuples(st.sampled_from(["add", "remove"]), st.integers(0, 12), _docs),
    min_size=1,
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(ops=_ops, query=st.lists(st.sampled_from(_VOCAB + ["zz"]), min_size=1, max_size=5))
def test_matches_bm25okapi_through_random_edits(ops, query):
    index = BM25Index()
    live: dict[str, list[str]] = {}
    with pytest.MonkeyPatch.context() as mp:
        # Compact after a few dead slots so that random edits exercise compaction.
        mp.setattr(slots_module, "COMPACT_MIN_DEAD", 2)
        for op, i, doc in ops:
            key = f"k{i}"
            if op == "add":
                if key in live:  # re-add with new text = remove + add
                    index.remove(key)
                index.add(key, doc)
                live[key] = doc
            elif key in live:
                index.remove(key)
                del live[key]
    assert len(index) == len(live)
    if live:
        assert_same_scores(index, live, query)


def _locomo_turns() -> list[str]:
    if not LOCOMO.exists():
        pytest.skip(f"LoCoMo data not found at {LOCOMO}")
    turns = []
    for conv in json.loads(LOCOMO.read_text())[:3]:
        for name, session in conv["conversation"].items():
            if name.startswith("session_") and isinstance(session, list):
                turns += [turn["text"] for turn in session]
    return turns


def test_matches_bm25okapi_on_locomo_turns():
    turns = _locomo_turns()
    index = BM25Index()
    live = {f"t{i}": tokenize(text) for i, text in enumerate(turns)}
    index.add_many(list(live), list(live.values()))
    queries = [
        "When did Caroline go to the LGBTQ support group?",
        "What does Melanie like to paint? painting painting",
        "the a I you",  # stopwords: idfs below zero, floored
        "camping trip with the kids last summer",
    ]
    for q in queries:
        assert_same_scores(index, live, tokenize(q))
    # Retire every third turn and rewrite every fifth: the scores follow the live corpus.
    for i in range(0, len(turns), 3):
        index.remove(f"t{i}")
        del live[f"t{i}"]
    for i in range(1, len(turns), 5):
        key = f"t{i}"
        if key in live:
            index.remove(key)
            live[key] = tokenize(turns[i] + " updated support group")
            index.add(key, live[key])
    for q in queries:
        assert_same_scores(index, live, tokenize(q))
