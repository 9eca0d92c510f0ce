"""Concurrent writers, readers and searchers on one owner: nothing lost, duplicated or resurrected.

Interleavings that matter are forced deterministically (an embedder hook runs the other handle's
write at the exact point between a read and a write); thread tests check counts and contents, never
timings. The final state of every concurrent run must equal a serial replay of the committed batches
in commit order (the order their history records were written).
"""

import json
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from membuilder import Memory
from membuilder.bank import MemoryBank
from membuilder.embedders import HashingEmbedder
from membuilder.operations import Add, Merge, Update
from membuilder.store import InMemoryStore, SQLiteStore
from membuilder.types import MemoryKind, OperationRejected, Status

from .conftest import FakeClock
from .test_bank_stateful import operation

E, S, P = MemoryKind.EPISODIC, MemoryKind.SEMANTIC, MemoryKind.PROCEDURAL
ROOT = Path(__file__).resolve().parents[2]


def _run_threads(fns):
    """Start all, release them together, join; re-raise the first exception of any thread."""
    errors = []
    barrier = threading.Barrier(len(fns))

    def wrap(fn):
        def run():
            barrier.wait()
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported to the test thread below
                errors.append(exc)
        return run

    threads = [threading.Thread(target=wrap(fn)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# --- item 2: concurrent apply on one owner -----------------------------------------------------


@pytest.mark.parametrize("backend", ["memory", "sqlite-shared", "sqlite-handles"])
def test_four_threads_times_100_adds_keep_400_entries_each_with_its_own_text(backend, tmp_path):
    path = tmp_path / "m.sqlite"
    if backend == "memory":
        memories = [Memory(embedder="hashing")] * 4
    elif backend == "sqlite-shared":
        memories = [Memory(path, embedder="hashing", busy_timeout=60)] * 4
    else:  # one connection per thread: what two processes on one file do
        memories = [Memory(path, embedder="hashing", busy_timeout=60) for _ in range(4)]
    results: dict[int, list[tuple[str, str]]] = {t: [] for t in range(4)}

    def writer(t):
        def run():
            for i in range(100):
                text = f"thread {t} fact {i}"
                results[t].append((memories[t].add(text, user_id="u")["id"], text))
        return run

    _run_threads([writer(t) for t in range(4)])
    added = [pair for t in range(4) for pair in results[t]]
    assert len(added) == 400 and len({i for i, _ in added}) == 400  # 400 distinct ids reported
    stored = {e["id"]: e["text"] for e in memories[0].get_all(user_id="u")}
    assert stored == dict(added)  # exactly those 400, each id holding the text its caller added
    history = [h for e in stored for h in memories[0].history(e, user_id="u")]
    assert sorted(h["seq"] for h in history) == list(range(1, 401))  # one ADD record each, no gaps
    # the counters continue after the 400: S401 is next, and search sees all entries
    assert memories[0].add("after", user_id="u")["id"] == "S401"
    found = {h["id"] for h in memories[0].search("thread fact", user_id="u", limit=1000)}
    assert found == set(stored) | {"S401"}  # dense ranking lists every entry, "after" included
    for m in {id(m): m for m in memories}.values():
        m.close()


def test_a_write_between_another_handles_read_and_write_cannot_collide(tmp_path, monkeypatch):
    """Handle A's embedder call is where A used to sit between planning and writing; handle B
    commits there. A must plan against B's commit: both batches kept, no id reused."""
    path = tmp_path / "b.sqlite"
    emb = HashingEmbedder(dim=16)
    a = MemoryBank(SQLiteStore(path), "u", embedder=emb, clock=FakeClock())
    b = MemoryBank(SQLiteStore(path), "u", embedder=HashingEmbedder(dim=16), clock=FakeClock(5000))
    real = emb.embed
    fired = []

    def embed_then_let_b_write(texts):
        if not fired:
            fired.append(1)
            b.apply([Add(S, "from B")], session_id="b")
        return real(texts)

    monkeypatch.setattr(emb, "embed", embed_then_let_b_write)
    assert a.apply([Add(S, "from A")], session_id="a").created == ("S2",)
    assert [(e.id, e.text) for e in a.entries()] == [("S1", "from B"), ("S2", "from A")]
    assert [(h.seq, h.entry_id, h.session_id) for h in a.history()] == [(1, "S1", "b"), (2, "S2", "a")]
    assert b.apply([Add(S, "B again")]).created == ("S3",)
    a.store.close()
    b.store.close()


def test_inserting_an_existing_id_never_overwrites_it(store, clock):
    bank = MemoryBank(store, "u", clock=clock)
    bank.apply([Add(S, "original")])
    clash = bank.get("S1").__class__(**{**bank.get("S1").__dict__, "text": "intruder"})
    from membuilder.types import StoreError

    with pytest.raises(StoreError, match="S1"):
        with store.transaction():
            store.insert_entries([clash], [None])
    assert bank.get("S1").text == "original"


# --- item 1: a search's re-embedding never undoes a concurrent write ----------------------------


def test_search_reembedding_keeps_a_concurrent_update_merge_and_counters(tmp_path, monkeypatch):
    path = tmp_path / "b.sqlite"
    writer = MemoryBank(SQLiteStore(path), "u", clock=FakeClock())  # BM25 only: stores no vectors
    writer.apply([Add(E, "went hiking", "2023-01-01"), Add(E, "went swimming", "2023-01-02"),
                  Add(S, "likes tea")])
    emb = HashingEmbedder(dim=32)
    searcher = MemoryBank(SQLiteStore(path), "u", embedder=emb, clock=FakeClock(9000))
    real = emb.embed
    fired = []

    def embed_with_a_write_in_between(texts):
        out = real(texts)
        if len(texts) > 1 and not fired:  # the bank's (re-)embedding, not the query's
            fired.append(1)
            writer.apply([Update(S, "S3", "likes green tea"),
                          Merge(E, ("E1", "E2"), "went hiking and swimming"), Add(P, "brew tea for 3 minutes")])
        return out

    monkeypatch.setattr(emb, "embed", embed_with_a_write_in_between)
    hits = searcher.search("tea hiking swimming", k=10)
    assert fired
    # the writer's batch is intact: update kept, merged entries still retired, counters not moved back
    assert writer.get("S3").text == "likes green tea"
    assert [writer.get(i).status for i in ("E1", "E2")] == [Status.RETIRED, Status.RETIRED]
    meta = writer.store.get_meta("u")
    # 3 ADDs (seq 1-3), UPDATE 4, RETIRE 5, RETIRE 6, MERGE 7, ADD 8; ids E1 E2 S3 E4 P5
    assert (meta.next_id, meta.next_seq) == (6, 9)
    assert writer.apply([Add(S, "next")]).created == ("S6",)
    # and the searcher answers from the current state (it saw the counters move and re-read)
    assert {h.entry.id for h in hits} == {"S3", "E4", "P5"}
    assert {h.entry.text for h in hits} >= {"likes green tea", "went hiking and swimming"}
    # the vectors written by the search are those of the current texts only
    stored = searcher.store.load_embeddings("u")
    assert "E1" not in stored and "E2" not in stored
    for i, text in [("S3", "likes green tea"), ("E4", "went hiking and swimming")]:
        if i in stored:
            assert (stored[i] == real([text])[0]).all()
    writer.store.close()
    searcher.store.close()


# --- the stateful property: concurrent batches == serial replay --------------------------------

batch = st.tuples(st.lists(operation(), min_size=1, max_size=3), st.booleans())
plans = st.lists(st.lists(batch, min_size=1, max_size=5), min_size=3, max_size=3)


def _comparable(state):
    """A state without wall-clock times (threads call the clock in a racy order)."""
    entries = sorted(
        (e.id, e.kind.value, e.text, e.status.value, e.session_id, e.event_time, e.merged_from, e.retired_by)
        for e in state.entries
    )
    history = [(h.seq, h.entry_id, h.event, h.old_text, h.new_text, h.session_id) for h in state.history]
    return state.meta.core, state.meta.next_id, state.meta.next_seq, entries, history


def _replay_and_compare(final, batches_by_session, outcomes, seen=()):
    """Replay the committed batches serially in commit order; compare with the concurrent result.
    Every snapshot a reader took meanwhile must be one of the replay's states (atomic commits)."""
    order = []
    for h in final.history:
        if not order or order[-1] != h.session_id:
            order.append(h.session_id)
    assert len(order) == len(set(order)), "one batch's history records are interleaved with another's"
    serial = MemoryBank(InMemoryStore(), final.owner, clock=FakeClock(), core_limit=40)
    prefixes = [repr(_comparable(serial.snapshot()))]
    for sid in order:
        ops, skip = batches_by_session[sid]
        result = serial.apply(ops, session_id=sid, skip_invalid=skip)
        got = outcomes[sid]
        assert (result.created, result.updated, result.retired) == (got.created, got.updated, got.retired)
        prefixes.append(repr(_comparable(serial.snapshot())))
    assert _comparable(serial.snapshot()) == _comparable(final)
    for state in seen:
        assert repr(_comparable(state)) in prefixes, "a reader saw a half-applied batch"
    created = [i for sid in order for i in outcomes[sid].created]
    assert len(created) == len(set(created))  # no id handed out twice


def _concurrent_run(banks, plan):
    """Writers: one thread per batch list (thread t uses banks[t % len(banks)]); one reader thread
    searches and snapshots until they finish. Returns (batches, outcomes, snapshots seen)."""
    batches, outcomes, seen = {}, {}, []
    running = [len(plan)]
    count_lock = threading.Lock()

    def writer(t, items):
        def run():
            try:
                for i, (ops, skip) in enumerate(items):
                    sid = f"t{t}b{i}"
                    batches[sid] = (ops, skip)
                    try:
                        outcomes[sid] = banks[t % len(banks)].apply(ops, session_id=sid, skip_invalid=skip)
                    except OperationRejected:
                        pass
            finally:
                with count_lock:
                    running[0] -= 1
        return run

    def reader():
        reader_bank = banks[-1]
        while running[0]:
            seen.append(reader_bank.snapshot().validate(core_limit=40))  # each one consistent
            for h in reader_bank.search("tea dog piano run", k=50):
                assert h.entry.status is Status.ACTIVE

    _run_threads([writer(t, items) for t, items in enumerate(plan)] + [reader])
    return batches, outcomes, seen


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=plans)
def test_threads_on_one_memory_store_equal_a_serial_replay(plan):
    store = InMemoryStore()
    bank = MemoryBank(store, "u", embedder=HashingEmbedder(dim=16), clock=FakeClock(), core_limit=40)
    batches, outcomes, seen = _concurrent_run([bank], plan)
    _replay_and_compare(bank.snapshot(), batches, outcomes, seen)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=plans)
def test_threads_on_two_sqlite_handles_equal_a_serial_replay(plan):
    with tempfile.TemporaryDirectory() as tmp:
        stores = [SQLiteStore(Path(tmp) / "b.sqlite", busy_timeout=60) for _ in range(2)]
        banks = [MemoryBank(s, "u", embedder=HashingEmbedder(dim=16), clock=FakeClock(), core_limit=40)
                 for s in stores]
        batches, outcomes, seen = _concurrent_run(banks, plan)
        _replay_and_compare(banks[0].snapshot(), batches, outcomes, seen)
        for s in stores:
            s.close()


_PROCESS_SCRIPT = textwrap.dedent("""
    import json, random, sys, time
    from membuilder.bank import MemoryBank
    from membuilder.operations import Add, Merge, Update
    from membuilder.store import SQLiteStore
    from membuilder.types import MemoryKind, OperationRejected
    path, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = random.Random(tag)
    bank = MemoryBank(SQLiteStore(path, busy_timeout=60), "u")
    print("ready", flush=True)  # start together: the parent says go once both are ready
    sys.stdin.readline()
    out = {}
    other = {"p": "q", "q": "p"}[tag]
    for i in range(n):
        if i == n // 2:
            # Halfway, wait for the other process's first commit (bounded), so the two always
            # interleave, however the OS schedules them: p.. q.. p.. at least.
            reader, deadline = SQLiteStore(path, busy_timeout=60), time.monotonic() + 120
            while time.monotonic() < deadline and not any(
                    h.session_id.startswith(other + "-") for h in reader.history("u")):
                time.sleep(0.01)
            reader.close()
        k = rng.randrange(1, 3 * n)
        ops = rng.choice([
            [Add(MemoryKind.SEMANTIC, f"{tag} fact {i}")],
            [Update(MemoryKind.SEMANTIC, f"S{k}", f"{tag} update {i}")],
            [Merge(MemoryKind.EPISODIC, (f"E{k}", f"E{k + 1}"), f"{tag} merge {i}")],
            [Add(MemoryKind.EPISODIC, f"{tag} event {i}"), Add(MemoryKind.EPISODIC, f"{tag} event' {i}")],
        ])
        sid = f"{tag}-{i}"
        try:
            r = bank.apply(ops, session_id=sid)
            out[sid] = [[type(o).__name__, o.kind.value, getattr(o, "id", None), list(getattr(o, "ids", ())),
                         getattr(o, "memory", None) or o.new_memory] for o in ops], list(r.created)
        except OperationRejected:
            pass
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_two_processes_on_one_file_equal_a_serial_replay(tmp_path):
    path = tmp_path / "b.sqlite"
    SQLiteStore(path).close()
    procs = [
        subprocess.Popen([sys.executable, "-c", _PROCESS_SCRIPT, str(path), tag, "400"], cwd=ROOT,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for tag in ("p", "q")
    ]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()[-2000:]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outputs = {}
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        outputs.update(json.loads(out))
    kinds = {"semantic": S, "episodic": E}
    batches, outcomes = {}, {}
    for sid, (ops, created) in outputs.items():
        typed = []
        for name, kind, id_, ids, text in ops:
            if name == "Add":
                typed.append(Add(kinds[kind], text))
            elif name == "Update":
                typed.append(Update(kinds[kind], id_, text))
            else:
                typed.append(Merge(kinds[kind], tuple(ids), text))
        batches[sid] = (typed, False)
        outcomes[sid] = created
    with SQLiteStore(path) as store:
        final = store.snapshot("u")
    order = []
    for h in final.history:
        if not order or order[-1] != h.session_id:
            order.append(h.session_id)
    assert sorted(order) == sorted(outputs)  # every reported commit is in the bank, once
    switches = sum(a[0] != b[0] for a, b in zip(order, order[1:]))
    assert switches >= 2, "the two processes never interleaved; the test would prove nothing"
    serial = MemoryBank(InMemoryStore(), "u", clock=FakeClock())
    for sid in order:
        assert list(serial.apply(batches[sid][0], session_id=sid).created) == outcomes[sid]
    assert _comparable(serial.snapshot()) == _comparable(final)
    assert sum(len(c) for c in outcomes.values()) == len(final.entries)  # none lost or duplicated


# --- a search sees writes made through another handle, incrementally ------------------------------


def test_another_handles_writes_are_caught_up_from_history_and_restores_rebuild(tmp_path, monkeypatch):
    path = tmp_path / "b.sqlite"
    writer = MemoryBank(SQLiteStore(path), "u", embedder=HashingEmbedder(dim=16), clock=FakeClock())
    reader = MemoryBank(SQLiteStore(path), "u", embedder=HashingEmbedder(dim=16), clock=FakeClock())
    writer.apply([Add(E, "tea in Kyoto", "2023-01-01"), Add(E, "tea in Paris", "2023-01-02"),
                  Add(S, "likes tea"), Add(P, "brew tea")])
    state = writer.snapshot()
    assert len(reader.search("tea")) == 4  # builds the reader's index
    full_reads = []
    real = reader.store.list_entries
    monkeypatch.setattr(reader.store, "list_entries", lambda *a, **k: full_reads.append(1) or real(*a, **k))

    def same_as_a_fresh_bank():
        fresh = MemoryBank(SQLiteStore(path), "u", embedder=HashingEmbedder(dim=16))
        want = [(h.entry, round(h.score, 9)) for h in fresh.search("tea Paris Kyoto green", k=10)]
        fresh.store.close()
        assert [(h.entry, round(h.score, 9)) for h in reader.search("tea Paris Kyoto green", k=10)] == want

    writer.apply([Update(S, "S3", "likes green tea"), Merge(E, ("E1", "E2"), "tea in Kyoto and Paris")])
    writer.delete("P4")
    same_as_a_fresh_bank()
    assert full_reads == []  # caught up from the 6 history records, not rebuilt
    writer.restore(state)  # history rewritten elsewhere: the record the reader saw last is gone
    writer.apply([Add(S, "green tea")])
    same_as_a_fresh_bank()
    assert full_reads == [1]  # the counter went back (10 -> 6): rebuilt
    writer.restore(state)  # now a history that diverges at seq 5 and runs past the reader's
    writer.apply([Add(S, "black tea")])
    writer.apply([Add(S, "tea in Paris again")])
    same_as_a_fresh_bank()
    assert full_reads == [1, 1]  # its record at seq 5 is not the one the reader saw: rebuilt
    writer.store.close()
    reader.store.close()
