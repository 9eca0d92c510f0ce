"""The copy-on-write candidate answers exactly like a bank rebuilt from the same state and operations."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from membuilder.agents.apply import apply_agent_outputs
from membuilder.bank import MemoryBank
from membuilder.embedders import HashingEmbedder
from membuilder.operations import Add, CoreAppend, Merge, Update
from membuilder.store import InMemoryStore
from reward.overlay import BaseBank, CandidateSearch, OverlayStore

WORDS = ["tea", "dog", "max", "ann", "bike", "paris", "red", "moved", "bread", "the", "a", "likes", "went", "to"]
EMB = HashingEmbedder(dim=32)


def _state(texts, owner="orig", embedder=EMB):
    bank = MemoryBank(InMemoryStore(), owner, embedder=embedder, clock=lambda: 5.0)
    kinds = ["episodic", "semantic", "procedural"]
    bank.apply([CoreAppend("Ann likes tea.")] + [Add(kinds[i % 3], t) for i, t in enumerate(texts)])
    return bank.snapshot()


def _rebuilt(state, owner, ops, embedder):
    bank = MemoryBank(InMemoryStore(), owner, embedder=embedder, clock=lambda: 7.0)
    bank.restore(state)
    bank.apply(ops, session_id="s", skip_invalid=True)
    return bank


def _overlay(state, owner, ops, embedder):
    store = OverlayStore(BaseBank(state, owner, embedder))
    bank = MemoryBank(store, owner, embedder=embedder, clock=lambda: 7.0)
    bank.apply(ops, session_id="s", skip_invalid=True)
    return bank, CandidateSearch(store)


def _same(a, b):
    assert [(r.entry.id, r.entry.text, r.bm25_rank, r.dense_rank) for r in a] == \
        [(r.entry.id, r.entry.text, r.bm25_rank, r.dense_rank) for r in b]
    assert [r.score for r in a] == pytest.approx([r.score for r in b], rel=1e-12)


text = st.lists(st.sampled_from(WORDS), min_size=0, max_size=6).map(" ".join).filter(lambda t: t.strip() or True)
entry_text = st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join)


@st.composite
def scenario(draw):
    texts = draw(st.lists(entry_text, min_size=0, max_size=12))
    n = len(texts)
    kinds = ["episodic", "semantic", "procedural"]
    ids = [f"{'ESP'[i % 3]}{i + 1}" for i in range(n)]
    ops = []
    for _ in range(draw(st.integers(0, 5))):
        choice = draw(st.integers(0, 2))
        if choice == 0 or n == 0:
            ops.append(Add(draw(st.sampled_from(kinds)), draw(entry_text)))
        elif choice == 1:
            i = draw(st.integers(0, n - 1))
            ops.append(Update(kinds[i % 3], ids[i], draw(entry_text)))
        else:
            epi = [ids[i] for i in range(n) if i % 3 == 0]
            if len(epi) >= 2:
                pair = draw(st.lists(st.sampled_from(epi), min_size=2, max_size=2, unique=True))
                ops.append(Merge("episodic", pair, draw(entry_text)))
    queries = draw(st.lists(st.lists(st.sampled_from(WORDS + ["zebra"]), min_size=1, max_size=5).map(" ".join),
                            min_size=1, max_size=3))
    k = draw(st.integers(1, 12))
    return texts, ops, queries, k


@settings(max_examples=60, deadline=None)
@given(scenario(), st.booleans())
def test_overlay_search_equals_a_rebuilt_bank(case, with_embedder):
    texts, ops, queries, k = case
    embedder = EMB if with_embedder else None
    state = _state(texts, embedder=embedder)
    rebuilt = _rebuilt(state, "req-owner", ops, embedder)
    bank, search = _overlay(state, "req-owner", ops, embedder)
    assert search.core == rebuilt.core
    assert {(e.id, e.text, e.status) for e in bank.entries(include_retired=True)} == \
        {(e.id, e.text, e.status) for e in rebuilt.entries(include_retired=True)}
    for q in queries:
        _same(search.search(q, k=k), rebuilt.search(q, k=k))
        _same(search.search(q, k=k, kinds=["semantic"]), rebuilt.search(q, k=k, kinds=["semantic"]))


def test_overlay_equals_rebuilt_on_a_larger_random_bank():
    """300 entries, BM25 with common terms (negative idf -> epsilon floor) and a 60-entry pool."""
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(1, 9))) for _ in range(300)]
    state = _state(texts)
    ops = [Update("semantic", "S2", "paris bike red"), Add("episodic", "the the the dog"),
           Merge("episodic", ["E1", "E4"], "ann moved to paris"), Update("procedural", "P3", "zebra")]
    rebuilt = _rebuilt(state, "o", ops, EMB)
    _, search = _overlay(state, "o", ops, EMB)
    for q in ["the dog", "ann moved to paris", "zebra the a", "red red bike", "nothing"]:
        _same(search.search(q, k=20), rebuilt.search(q, k=20))


def test_candidates_share_one_base_and_do_not_see_each_other():
    state = _state(["ann likes tea", "max is a dog"])
    base = BaseBank(state, "o", EMB)
    stores = [OverlayStore(base) for _ in range(2)]
    outputs = [{"episodic": '{"operations": [{"action": "ADD", "memory": "ann went to paris"}]}'},
               {"semantic": '{"operations": [{"action": "UPDATE", "id": "S2", "new_memory": "max is a cat"}]}'}]
    for store, out in zip(stores, outputs):
        apply_agent_outputs(MemoryBank(store, "o", embedder=EMB), out, session_id="s", drop_invalid_agents=True)
    a, b = (CandidateSearch(s) for s in stores)
    assert [r.entry.text for r in a.search("paris", k=5)][0] == "ann went to paris"
    assert "ann went to paris" not in [r.entry.text for r in b.search("paris", k=5)]
    assert [r.entry.text for r in b.search("max", k=1)] == ["max is a cat"]
    assert base.entries["S2"].text == "max is a dog"  # the base is never written
    assert len(base) == 2 and len(a) == 3 and len(b) == 2


def test_overlay_snapshot_equals_the_rebuilt_state():
    state = _state(["ann likes tea", "max is a dog", "bread recipe"])
    ops = [Update("semantic", "S2", "max is a cat"), Add("procedural", "new routine")]
    rebuilt = _rebuilt(state, "orig", ops, EMB)
    bank, _ = _overlay(state, "orig", ops, EMB)
    assert bank.snapshot() == rebuilt.snapshot()
