"""Record types round-trip exactly through to_dict / from_dict, and the JSONL reader/writer."""

import json
import threading

import pytest

from membuilder.agents import MemoryBuilder
from membuilder.agents.records import (
    AgentRecord,
    RecordFormatError,
    SessionRecord,
    apply_result_from_dict,
    apply_result_to_dict,
    read_records,
    write_records,
)
from membuilder.bank import ApplyResult, MemoryBank
from membuilder.operations import Add, CoreAppend
from membuilder.snapshots import SnapshotStore, state_digest
from membuilder.store import InMemoryStore
from membuilder.types import MemoryKind, Rejection

from .test_builder import SESSION, VALID, Scripted


@pytest.fixture
def records(bank, clock):
    bank.apply([Add("semantic", "Max is a cat.")])
    answers = dict(VALID, semantic=json.dumps({"operations": [
        {"action": "UPDATE", "id": "S99", "new_memory": "x"}, {"action": "ADD", "memory": "ok"}]}),
        episodic=RuntimeError("down"))
    b = MemoryBank(InMemoryStore(), "o", clock=clock, core_limit=40)
    b.apply([CoreAppend("a" * 30)])
    compressing = Scripted(dict(VALID, core='{"action": "APPEND", "content": "' + "b" * 20 + '"}'),
                           compress='{"action": "REWRITE", "content": "short"}')
    return [MemoryBuilder(Scripted(answers)).add_session(bank, SESSION, session_index=2),
            MemoryBuilder(compressing).add_session(b, SESSION)]


def test_session_records_round_trip_exactly(records):
    for record in records:
        for with_state in (False, True):
            d = json.loads(json.dumps(record.to_dict(with_state=with_state)))
            back = SessionRecord.from_dict(d)
            assert back.to_dict(with_state=with_state) == d
        full = SessionRecord.from_dict(record.to_dict(with_state=True))
        assert full == record  # with the state, the record itself comes back equal
        slim = SessionRecord.from_dict(record.to_dict())
        assert slim.state_before is None and slim.snapshot_id == state_digest(record.state_before)
        assert slim.agents == record.agents and slim.result == record.result
    assert records[0].agents[MemoryKind.SEMANTIC].valid is False  # the S99 UPDATE
    assert records[1].agents[MemoryKind.CORE].compression.operation.content == "short"


def test_apply_result_keeps_the_rejected_operations():
    r = ApplyResult(("E1",), ("S2",), ("E3",), True, (Rejection(4, Add("semantic", "x"), "why"),))
    assert apply_result_from_dict(json.loads(json.dumps(apply_result_to_dict(r)))) == r


def test_a_record_can_carry_a_snapshot_id_instead_of_the_state(records, tmp_path):
    store = SnapshotStore(tmp_path / "snaps")
    rec = records[0]
    sid = store.put(rec.state_before)
    slim = SessionRecord(rec.owner, rec.session_id, None, rec.agents, rec.result, snapshot_id=sid)
    assert slim.to_dict()["state_before_sha256"] == sid == rec.to_dict()["state_before_sha256"]
    assert store.get(SessionRecord.from_dict(slim.to_dict()).snapshot_id) == rec.state_before
    with pytest.raises(ValueError, match="64 lowercase hex"):
        SessionRecord(rec.owner, rec.session_id, None, rec.agents, rec.result, snapshot_id="../x")


def test_jsonl_append_and_read_back(records, tmp_path):
    path = tmp_path / "t.jsonl"
    assert write_records(path, records[:1]) == 1
    assert write_records(path, records[1:]) == 1
    back = read_records(path)
    assert [r.to_dict() for r in back] == [r.to_dict() for r in records]


def test_concurrent_appends_never_interleave(records, tmp_path):
    path = tmp_path / "t.jsonl"
    threads = [threading.Thread(target=write_records, args=(path, records * 5)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(read_records(path)) == 40


def test_bad_lines_are_named(records, tmp_path):
    path = tmp_path / "t.jsonl"
    write_records(path, records)
    good = path.read_text()
    path.write_text(good + "{not json\n")
    with pytest.raises(RecordFormatError, match="line 3 is not JSON"):
        read_records(path)
    d = records[0].to_dict()
    d["agents"]["semantic"]["operations"] = [{"action": "FLY"}]
    path.write_text(good + json.dumps(d) + "\n")
    with pytest.raises(RecordFormatError, match=r"line 3\.agents\.semantic\.operations\[0\]: action 'FLY'"):
        read_records(path)
    del d["agents"]
    path.write_text(good + json.dumps(d) + "\n")
    with pytest.raises(RecordFormatError, match=r"line 3\.agents is missing"):
        read_records(path)


def test_a_cut_off_last_line_is_refused_not_extended(records, tmp_path):
    path = tmp_path / "t.jsonl"
    write_records(path, records[:1])
    torn = path.read_text() + '{"owner": "o", "sess'
    path.write_text(torn)
    with pytest.raises(RecordFormatError, match="line 2 is incomplete"):
        write_records(path, records[1:])
    assert path.read_text() == torn  # nothing appended, nothing lost
    with pytest.raises(RecordFormatError, match="line 2 is incomplete"):
        read_records(path)
    with pytest.raises(ValueError, match="not a SessionRecord"):
        write_records(tmp_path / "u.jsonl", [records[0].to_dict()])
    assert not (tmp_path / "u.jsonl").exists()


def test_eval_memory_trajectories_are_this_format(tmp_path):
    """benchmarks/eval_memory.py --save-trajectories writes files that read_records reads."""
    from benchmarks.eval_memory import bank_file, run
    from membuilder.datasets import default_data_dir
    locomo = default_data_dir() / "locomo" / "locomo10.json"
    if not locomo.exists():
        pytest.skip(f"LoCoMo not found at {locomo}")
    run(["--dataset", "locomo", "--data", str(locomo), "--conversations", "1", "--sessions", "2",
         "--embedder", "hashing", "--no-progress", "--builder", "annotation", "--mode", "build",
         "--save-trajectories", "--out", str(tmp_path)])
    path = bank_file(tmp_path / "banks", "conv-26").with_suffix(".trajectories.jsonl")
    back = read_records(path)
    assert [r.session_id for r in back] == ["session_1", "session_2"]
    assert back[0].snapshot_id == state_digest(SnapshotStore(tmp_path / "s").get(
        SnapshotStore(tmp_path / "s").put(_empty_state("conv-26"))))
    assert all(a.valid for r in back for a in r.agents.values())  # the annotation expert passes the gate


def _empty_state(owner):
    return MemoryBank(InMemoryStore(), owner).snapshot()


def test_agent_record_from_dict_rejects_wrong_kinds():
    rec = AgentRecord(MemoryKind.EPISODIC, [], "{}", (Add("episodic", "x"),), (), None)
    assert AgentRecord.from_dict(rec.to_dict()) == rec
    bad = dict(rec.to_dict(), kind="nope")
    with pytest.raises(RecordFormatError, match="agent.kind"):
        AgentRecord.from_dict(bad)
