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


# --- issue 11 item 4: two embedding models never mix under one label ------------------------------


class _Negated(HashingEmbedder):
    def __init__(self):
        super().__init__(dim=64)
        self.name = "negated-hashing:dim=64"

    def embed(self, texts):
        return -super().embed(texts)


def test_a_second_embedding_model_never_ranks_with_the_first_models_vectors(tmp_path):
    m1 = HashingEmbedder(dim=64)  # two models of one dimension: only the name tells them apart
    m2 = _Negated()  # cos(-q, -d) == cos(q, d): alone it ranks as m1 does; mixed with m1, reversed
    texts = ["hiking in the alps", "baking sourdough bread", "a hike up the mountain", "bread and butter"]
    reference = MemoryBank(InMemoryStore(), "u", embedder=m2, clock=FakeClock())  # m2 only, ever
    reference.apply([Add(S, t) for t in texts[:3]])
    reference.apply([Add(S, texts[3])])
    expected = [(h.entry.id, round(h.score, 9), h.dense_rank) for h in reference.search("hike bread")]
    path = tmp_path / "b.sqlite"
    with SQLiteStore(path) as store:
        first = MemoryBank(store, "u", embedder=m1, clock=FakeClock())
        first.apply([Add(S, t) for t in texts[:3]])
        first.search("hike")
    with SQLiteStore(path) as store:
        second = MemoryBank(store, "u", embedder=m2, clock=FakeClock())
        second.apply([Add(S, texts[3])])  # used to relabel the bank and keep m1's three vectors
        got = [(h.entry.id, round(h.score, 9), h.dense_rank) for h in second.search("hike bread")]
        assert got == expected
        stored = store.load_embeddings("u", embedder=m2.name)
        assert sorted(stored) == ["S1", "S2", "S3", "S4"]  # every active entry now has an m2 vector
        for e in second.entries():
            np.testing.assert_array_equal(stored[e.id], m2.embed([e.text])[0])
        state = second.snapshot()
        assert state.meta.embedder == m2.name and [k for k, _ in state.embeddings] == ["S1", "S2", "S3", "S4"]
    # and back: the first model re-embeds what the second wrote instead of mixing
    with SQLiteStore(path) as store:
        again = MemoryBank(store, "u", embedder=m1, clock=FakeClock())
        ranked = [(h.entry.id, round(h.score, 9)) for h in again.search("hike bread")]
    only_m1 = MemoryBank(InMemoryStore(), "u", embedder=m1, clock=FakeClock())
    only_m1.apply([Add(S, t) for t in texts])
    assert ranked == [(h.entry.id, round(h.score, 9)) for h in only_m1.search("hike bread")]


def test_a_schema_1_file_is_migrated_with_its_vectors_labelled(tmp_path):
    path = tmp_path / "old.sqlite"
    emb = HashingEmbedder(dim=16)
    with SQLiteStore(path) as store:
        MemoryBank(store, "u", embedder=emb, clock=FakeClock()).apply([Add(S, "green tea")])
    conn = sqlite3.connect(path)  # rebuild the file as schema 1 wrote it: no per-vector model
    conn.executescript("ALTER TABLE entries DROP COLUMN embedder; PRAGMA user_version=1;")
    conn.close()
    with SQLiteStore(path, readonly=True) as store:  # read-only: read as schema 1, nothing written
        assert sorted(store.load_embeddings("u", embedder=emb.name)) == ["S1"]
    with SQLiteStore(path) as store:
        assert store._conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert sorted(store.load_embeddings("u", embedder=emb.name)) == ["S1"]
        assert store.load_embeddings("u", embedder="another model") == {}


# --- item 5: an embedder returning NaN is refused before the transaction ---------------------------


class _NaNFor(HashingEmbedder):
    """A broken model: NaN rows for texts containing "poison"."""

    def embed(self, texts):
        out = super().embed(texts)
        out[[i for i, t in enumerate(texts) if "poison" in t]] = np.nan
        return out


def test_an_embedder_returning_nan_writes_nothing_and_search_keeps_working(store):
    from membuilder.embedders import EmbeddingError

    bank = MemoryBank(store, "u", embedder=_NaNFor(dim=16), clock=FakeClock())
    bank.apply([Add(S, "green tea")])
    assert [h.entry.id for h in bank.search("tea")] == ["S1"]
    before = bank.snapshot()
    with pytest.raises(EmbeddingError, match="non-finite values .* 1 of 2 texts"):
        bank.apply([Add(S, "fine tea"), Add(S, "poison tea")])
    assert bank.snapshot() == before  # nothing committed, so a retry cannot apply it twice
    assert [h.entry.id for h in bank.search("tea")] == ["S1"]
    with pytest.raises(EmbeddingError, match="non-finite"):
        bank.search("poison")  # a NaN query vector is an error, not a silent garbage ranking
    with pytest.raises(InvalidInputError, match="non-finite"):
        bank.search("tea", query_embedding=np.full(16, np.nan))
    assert bank.apply([Add(S, "fine tea")]).created == ("S2",)
    assert bank.snapshot().meta.next_seq == 3  # exactly two ADDs ever committed


# --- item 15: reads never take the write lock; a busy bank is a clear StoreError ------------------


def test_snapshot_and_export_read_while_another_connection_writes(tmp_path, capsys):
    from membuilder.cli import main

    path = tmp_path / "b.sqlite"
    writer = SQLiteStore(path)
    bank = MemoryBank(writer, "u", clock=FakeClock())
    bank.apply([Add(S, "committed")])
    committed = bank.snapshot()
    reader = SQLiteStore(path, busy_timeout=0.05)
    with writer.transaction():  # another connection holds the write lock, with a write in flight
        MemoryBank(writer, "u", clock=FakeClock(50)).apply([Add(S, "in flight")])
        assert reader.snapshot("u") == committed  # neither blocked nor sees uncommitted data
        assert main(["export", str(path), "--owner", "u"]) == 0
        assert [e["text"] for e in json.loads(capsys.readouterr().out)["entries"]] == ["committed"]
    assert [e.text for e in MemoryBank(reader, "u").entries()] == ["committed", "in flight"]
    reader.close()
    writer.close()


def test_a_busy_bank_raises_a_clear_store_error_and_writes_nothing(tmp_path):
    path = tmp_path / "b.sqlite"
    holder = SQLiteStore(path)
    other = MemoryBank(SQLiteStore(path, busy_timeout=0.05), "u", clock=FakeClock())
    other.apply([Add(S, "first")])
    with holder.transaction():
        with pytest.raises(StoreError, match=r"is busy: another connection held its write lock .*busy_timeout"):
            other.apply([Add(S, "second")])
    assert [e.text for e in other.entries()] == ["first"]
    assert other.apply([Add(S, "second")]).created == ("S2",)  # nothing half-written, ids continue
    with pytest.raises(InvalidInputError, match="busy_timeout"):
        SQLiteStore(path, busy_timeout=-1)
    holder.close()
    other.store.close()


def test_a_read_only_store_reads_and_refuses_writes(tmp_path):
    path = tmp_path / "b.sqlite"
    with SQLiteStore(path) as store:
        MemoryBank(store, "u", embedder=HashingEmbedder(dim=8), clock=FakeClock()).apply([Add(S, "tea")])
    with SQLiteStore(path, readonly=True) as ro:
        bank = MemoryBank(ro, "u", embedder=HashingEmbedder(dim=16), clock=FakeClock())
        assert [h.entry.id for h in bank.search("tea")] == ["S1"]  # re-embedded in memory only
        with pytest.raises(StoreError, match="read-only"):
            bank.apply([Add(S, "x")])
    with SQLiteStore(path) as store:
        assert store.get_meta("u").embedder == HashingEmbedder(dim=8).name
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    for kwargs in ({"readonly": True}, {"create": False}):
        with pytest.raises(StoreError, match="not a MemBuilder bank"):
            SQLiteStore(empty, **kwargs)
        assert empty.stat().st_size == 0
