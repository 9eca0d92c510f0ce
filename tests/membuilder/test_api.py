"""The mem0-style public API: add / search / get / update / delete / history, scoped by user id."""

import pytest

from membuilder import Memory
from membuilder.types import InvalidInputError, OperationRejected, UnknownEntryError

from .conftest import FakeClock


@pytest.fixture(params=[None, "file"])
def memory(request, tmp_path):
    path = None if request.param is None else tmp_path / "m.sqlite"
    with Memory(path, embedder="hashing", clock=FakeClock()) as m:
        yield m


def test_add_search_get_update_delete_history(memory):
    mid = memory.add("Caroline adopted a dog named Max", user_id="u1")["id"]
    assert mid == "S1"
    memory.add("Went camping at the lake", user_id="u1", kind="episodic", time="2023-07-01")
    assert [h["id"] for h in memory.search("dog Max", user_id="u1", limit=1)] == ["S1"]
    assert memory.get(mid, user_id="u1")["text"] == "Caroline adopted a dog named Max"
    updated = memory.update(mid, "Caroline adopted two dogs", user_id="u1")
    assert updated["text"] == "Caroline adopted two dogs" and updated["id"] == mid
    assert [h["event"] for h in memory.history(mid, user_id="u1")] == ["ADD", "UPDATE"]
    memory.delete(mid, user_id="u1")
    assert memory.get(mid, user_id="u1")["status"] == "retired"
    assert [h["id"] for h in memory.search("dogs", user_id="u1")] != [mid]
    assert [e["id"] for e in memory.get_all(user_id="u1")] == ["E2"]
    assert [e["id"] for e in memory.get_all(user_id="u1", include_retired=True)] == ["S1", "E2"]


def test_core_through_the_api(memory):
    memory.add("Name: Caroline", user_id="u1", kind="core")
    memory.add("Counsellor", user_id="u1", kind="core")
    assert memory.core(user_id="u1") == "Name: Caroline\nCounsellor"
    assert [h["event"] for h in memory.history("core", user_id="u1")] == ["CORE_APPEND", "CORE_APPEND"]


def test_user_ids_scope_everything(memory):
    mid = memory.add("secret of u1", user_id="u1")["id"]
    assert memory.search("secret", user_id="u2") == []
    with pytest.raises(UnknownEntryError):
        memory.get(mid, user_id="u2")
    with pytest.raises(UnknownEntryError):
        memory.update(mid, "hacked", user_id="u2")
    with pytest.raises(UnknownEntryError):
        memory.history(mid, user_id="u2")
    assert memory.get(mid, user_id="u1")["text"] == "secret of u1"


def test_scoping_ids_are_keyword_only_and_validated(memory):
    with pytest.raises(TypeError):
        memory.add("x", "u1")  # noqa
    with pytest.raises(InvalidInputError, match="owner must be a non-empty string"):
        memory.add("x", user_id="")
    with pytest.raises(InvalidInputError, match="unknown memory kind"):
        memory.add("x", user_id="u1", kind="feelings")
    with pytest.raises(OperationRejected):
        memory.delete(memory.add("x", user_id="u1")["id"], user_id="u1") or memory.delete("S1", user_id="u1")


def test_construction_has_no_side_effects(tmp_path, monkeypatch):
    """Nothing is loaded or fetched at construction: the MiniLM model loads on first use."""
    import membuilder.embedders as emb

    calls = []
    monkeypatch.setattr(emb.SentenceTransformerEmbedder, "_load", lambda self: calls.append(1))
    Memory(tmp_path / "m.sqlite").close()
    assert calls == []
    with pytest.raises(InvalidInputError, match="unknown embedder"):
        Memory(embedder="word2vec")
