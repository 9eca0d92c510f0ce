import gzip
import json
import threading

import pytest

from membuilder import InMemoryStore, MemoryBank, parse_operations
from membuilder.snapshots import SnapshotStore, UnknownSnapshotError, check_snapshot_id, state_digest
from membuilder.types import InvalidInputError


def _state(owner="conv-1", texts=("Caroline adopted a dog",)):
    bank = MemoryBank(InMemoryStore(), owner)
    bank.apply(parse_operations("semantic", {"operations": [{"action": "ADD", "memory": t} for t in texts]}),
               session_id="s1")
    return bank.snapshot()


def test_put_get_round_trip_and_same_id_for_same_content(tmp_path):
    store = SnapshotStore(tmp_path)
    state = _state()
    sid = store.put(state)
    assert sid == state_digest(state) and len(sid) == 64
    assert store.put(state) == sid  # saved once
    assert store.ids() == [sid]
    fresh = SnapshotStore(tmp_path)  # no cache: read from disk
    assert fresh.get(sid) == state
    assert sid in fresh and "0" * 64 not in fresh


def test_different_content_different_id(tmp_path):
    store = SnapshotStore(tmp_path)
    assert store.put(_state(texts=("a dog",))) != store.put(_state(texts=("a cat",)))


@pytest.mark.parametrize("bad", ["../etc/passwd", "ABC", "0" * 63, "0" * 64 + "/", "G" * 64, 42, None])
def test_bad_ids_are_refused_before_any_path_is_built(tmp_path, bad):
    store = SnapshotStore(tmp_path)
    with pytest.raises(InvalidInputError, match="snapshot id"):
        store.get(bad)
    assert bad not in store
    with pytest.raises(InvalidInputError):
        check_snapshot_id(bad)


def test_unknown_id_names_it(tmp_path):
    with pytest.raises(UnknownSnapshotError, match="f" * 64):
        SnapshotStore(tmp_path).get("f" * 64)


def test_edited_file_is_detected(tmp_path):
    store = SnapshotStore(tmp_path)
    sid = store.put(_state())
    path = store.path(sid)
    data = json.loads(gzip.decompress(path.read_bytes()))
    data["core"] = "tampered"
    path.write_bytes(gzip.compress(json.dumps(data).encode()))
    with pytest.raises(InvalidInputError, match="does not hash"):
        SnapshotStore(tmp_path).get(sid)


def test_lru_cache_is_bounded(tmp_path):
    store = SnapshotStore(tmp_path, cache_size=2)
    ids = [store.put(_state(texts=(f"fact {i}",))) for i in range(4)]
    assert list(store._cache) == ids[2:]
    store.get(ids[0])
    assert list(store._cache) == [ids[3], ids[0]]


def test_concurrent_writers_of_one_state(tmp_path):
    state = _state()
    errors = []

    def put():
        try:
            SnapshotStore(tmp_path).put(state)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=put) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert SnapshotStore(tmp_path).get(state_digest(state)) == state
    assert not list(tmp_path.glob("*/.tmp-*"))
