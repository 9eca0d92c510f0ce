"""Persistence, atomicity under injected failures, and bad input that must lose nothing."""

import json
import os
import sqlite3

import numpy as np
import pytest

from membuilder.bank import MemoryBank
from membuilder.embedders import HashingEmbedder
from membuilder.operations import Add, CoreAppend, Merge, Update
from membuilder.store import InMemoryStore, SQLiteStore, open_store
from membuilder.types import BankState, InvalidInputError, MemoryKind, OperationRejected, StoreError

from .conftest import FakeClock

E, S = MemoryKind.EPISODIC, MemoryKind.SEMANTIC


def _fill(bank):
    bank.apply([Add(E, "moved to Denver", "2023-02-01"), Add(S, "has a cat named Max"), CoreAppend("Ann, 34")],
               session_id="s1")
    bank.apply([Update(S, "S2", "has two cats"), Add(E, "adopted a cat", "2023-03-01")], session_id="s2")
    bank.apply([Merge(E, ("E1", "E3"), "moved and adopted")], session_id="s3")


def test_sqlite_bank_is_identical_after_close_and_reopen(tmp_path):
    path = tmp_path / "bank.sqlite"
    with SQLiteStore(path) as store:
        bank = MemoryBank(store, "ann", embedder=HashingEmbedder(dim=64), clock=FakeClock())
        _fill(bank)
        MemoryBank(store, "bob", clock=FakeClock()).apply([Add(S, "bob's fact")])
        before = bank.snapshot()
        hits_before = [(h.entry.id, round(h.score, 9)) for h in bank.search("cat")]
    assert len(before.embeddings) == 2  # active entries carry their vectors
    with SQLiteStore(path) as store:
        assert store.owners() == ["ann", "bob"]
        bank = MemoryBank(store, "ann", embedder=HashingEmbedder(dim=64), clock=FakeClock())
        assert bank.snapshot() == before
        assert [(h.entry.id, round(h.score, 9)) for h in bank.search("cat")] == hits_before
        assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("where", ["put_entries", "set_meta", "append_history"])
def test_failure_inside_a_session_leaves_the_bank_as_before(store, where, monkeypatch):
    bank = MemoryBank(store, "ann", clock=FakeClock())
    _fill(bank)
    before = bank.snapshot()
    assert [h.entry.id for h in bank.search("cats")] == ["S2"]
    original = getattr(store, where)

    def fail_after_writing(*args, **kwargs):
        original(*args, **kwargs)  # the first writes reach the store...
        raise RuntimeError("disk on fire")  # ...then the session fails

    monkeypatch.setattr(store, where, fail_after_writing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        bank.apply([Add(S, "cats are great"), Update(S, "S2", "no cats"), CoreAppend("more")])
    monkeypatch.undo()
    assert bank.snapshot() == before
    assert [h.entry.id for h in bank.search("cats")] == ["S2"]
    assert bank.apply([Add(S, "next")]).created == ("S5",)  # the id counter did not move


def test_embedder_failure_writes_nothing(store):
    class Broken(HashingEmbedder):
        fail = False

        def embed(self, texts):
            if self.fail:
                raise ConnectionError("embedding endpoint down")
            return super().embed(texts)

    emb = Broken(dim=32)
    bank = MemoryBank(store, "ann", embedder=emb, clock=FakeClock())
    _fill(bank)
    before = bank.snapshot()
    emb.fail = True
    with pytest.raises(ConnectionError):
        bank.apply([Add(S, "x")])
    assert bank.snapshot() == before


def test_reopening_with_another_embedder_reembeds_once(tmp_path):
    path = tmp_path / "b.sqlite"
    with SQLiteStore(path) as store:
        _fill(MemoryBank(store, "ann", embedder=HashingEmbedder(dim=16), clock=FakeClock()))
    with SQLiteStore(path) as store:
        bank = MemoryBank(store, "ann", embedder=HashingEmbedder(dim=32), clock=FakeClock())
        bank.search("cat")
        state = bank.snapshot()
        assert state.meta.embedder == HashingEmbedder(dim=32).name
        assert {len(v) for _, v in state.embeddings} == {32 * 4}


def test_corrupt_file_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "junk.sqlite"
    payload = os.urandom(4096)
    path.write_bytes(payload)
    with pytest.raises(StoreError, match="junk.sqlite"):
        SQLiteStore(path)
    assert path.read_bytes() == payload


def test_foreign_sqlite_file_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.execute("INSERT INTO users VALUES ('x')")
    conn.commit()
    conn.close()
    payload = path.read_bytes()
    with pytest.raises(StoreError, match="not a MemBuilder bank"):
        SQLiteStore(path)
    assert path.read_bytes() == payload


def test_unusable_paths_give_clear_errors(tmp_path):
    with pytest.raises(StoreError, match="is a directory"):
        SQLiteStore(tmp_path)
    with pytest.raises(StoreError, match="does not exist"):
        SQLiteStore(tmp_path / "missing" / "bank.sqlite")
    if os.geteuid() != 0:  # root can read anything; the check is meaningful for normal users
        locked = tmp_path / "locked.sqlite"
        SQLiteStore(locked).close()
        locked.chmod(0)
        with pytest.raises(StoreError, match="permission"):
            SQLiteStore(locked)


def test_empty_file_becomes_a_bank(tmp_path):
    path = tmp_path / "new.sqlite"
    path.touch()
    with SQLiteStore(path) as store:
        assert store.owners() == []


def test_bad_input_loses_nothing(store):
    bank = MemoryBank(store, "ann", clock=FakeClock())
    _fill(bank)
    before = bank.snapshot()
    cases = [
        (lambda: bank.apply([Add(S, 42)]), InvalidInputError, "'memory' must be a string"),
        (lambda: bank.apply([Add("gossip", "x")]), InvalidInputError, "unknown memory kind 'gossip'"),
        (lambda: bank.apply([CoreAppend("x" * 6000)]), OperationRejected, "over the limit of 5000"),
        (lambda: bank.search(None), InvalidInputError, "query must be a string"),
        (lambda: bank.restore({"owner": "ann"}), InvalidInputError, "restore takes a BankState"),
        (lambda: MemoryBank(store, ""), InvalidInputError, "owner must be a non-empty string"),
        (lambda: bank.get(7), InvalidInputError, "entry id must be a string"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    assert bank.snapshot() == before


def test_writes_outside_a_transaction_are_refused(store):
    from membuilder.types import OwnerMeta

    with pytest.raises(StoreError, match="inside store.transaction"):
        store.set_meta("ann", OwnerMeta(core="x"))


def test_json_export_round_trip_is_exact(store):
    bank = MemoryBank(store, "ann", embedder=HashingEmbedder(dim=8), clock=FakeClock())
    _fill(bank)
    state = bank.snapshot()
    again = BankState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert again == state
    other = MemoryBank(InMemoryStore(), "ann", clock=FakeClock())
    other.restore(again)
    assert other.snapshot() == state
    with pytest.raises(InvalidInputError, match="not a MemBuilder bank export"):
        BankState.from_dict({"entries": []})


def test_open_store_picks_the_backend(tmp_path):
    assert isinstance(open_store(None), InMemoryStore)
    assert isinstance(open_store(":memory:"), InMemoryStore)
    s = open_store(tmp_path / "x.sqlite")
    assert isinstance(s, SQLiteStore)
    s.close()


def test_embeddings_are_stored_next_to_entries(store):
    emb = HashingEmbedder(dim=16)
    bank = MemoryBank(store, "ann", embedder=emb, clock=FakeClock())
    bank.apply([Add(S, "green tea")])
    stored = store.load_embeddings("ann")
    np.testing.assert_array_equal(stored["S1"], emb.embed(["green tea"])[0])
