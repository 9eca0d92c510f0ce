"""Operation semantics of DESIGN section 1, worked by hand, on every store."""

import pytest

from membuilder.bank import MemoryBank
from membuilder.operations import Add, CoreAppend, CoreReplace, CoreRewrite, Merge, Skip, Update
from membuilder.types import (
    CORE_LIMIT,
    InvalidInputError,
    MemoryKind,
    OperationRejected,
    Status,
    UnknownEntryError,
)

E, S, P = MemoryKind.EPISODIC, MemoryKind.SEMANTIC, MemoryKind.PROCEDURAL


@pytest.fixture
def bank(store, clock):
    return MemoryBank(store, "alice", clock=clock)


def test_add_assigns_stable_kind_prefixed_ids_and_provenance(bank):
    r = bank.apply(
        [Add(E, "Went to Paris", "2023-05-08"), Add(S, "Owns a cat"), Add(P, "Brew: grind, bloom, pour")],
        session_id="s1",
    )
    assert r.created == ("E1", "S2", "P3")
    e1 = bank.get("E1")
    assert (e1.kind, e1.text, e1.status, e1.session_id, e1.event_time) == (
        E, "Went to Paris", Status.ACTIVE, "s1", "2023-05-08"
    )
    # the fake clock gives one timestamp per batch: the batch started at 1000.0
    assert e1.created_at == e1.updated_at == 1000.0
    # ids keep counting after more batches, never reused
    assert bank.apply([Add(S, "Likes jazz")]).created == ("S4",)


def test_update_replaces_text_and_keeps_the_old_one_in_history(bank):
    bank.apply([Add(S, "Lives in Boston")], session_id="s1")
    r = bank.apply([Update(S, "S1", "Lives in Denver")], session_id="s2")
    assert r.updated == ("S1",) and r.created == ()
    assert bank.get("S1").text == "Lives in Denver"
    assert [e.text for e in bank.entries()] == ["Lives in Denver"]  # replaced, not appended
    hist = bank.history("S1")
    assert [(h.event, h.old_text, h.new_text, h.session_id) for h in hist] == [
        ("ADD", None, "Lives in Boston", "s1"),
        ("UPDATE", "Lives in Boston", "Lives in Denver", "s2"),
    ]


def test_merge_retires_its_sources_and_points_to_them(bank):
    bank.apply([Add(E, "Trip day 1", "2023-05-02"), Add(E, "Trip day 2", "2023-05-01")])
    r = bank.apply([Merge(E, ("E1", "E2"), "Two-day trip")])
    assert r.created == ("E3",) and r.retired == ("E1", "E2")
    new = bank.get("E3")
    assert new.merged_from == ("E1", "E2")
    assert new.event_time == "2023-05-01"  # no time given: the earliest of its sources
    for old in ("E1", "E2"):
        entry = bank.get(old)
        assert entry.status is Status.RETIRED and entry.retired_by == "E3"
    assert [e.id for e in bank.entries()] == ["E3"]
    assert [e.id for e in bank.entries(include_retired=True)] == ["E1", "E2", "E3"]


def test_skip_and_empty_lists_change_nothing(bank):
    bank.apply([Add(S, "x")])
    before = bank.snapshot()
    assert bank.apply([]) == bank.apply([Skip(S, "nothing new")])
    assert bank.snapshot() == before
    assert bank.apply([Add(S, "y")]).created == ("S2",)  # SKIP consumed no id


@pytest.mark.parametrize(
    "op, reason",
    [
        (Update(S, "S9", "x"), "no entry with id 'S9'"),
        (Update(E, "S1", "x"), "is semantic memory, not episodic"),
        (Update(E, "E2", "x"), "retired (merged into E4)"),
        (Merge(E, ("E2", "E3"), "x"), "retired"),
        (Merge(E, ("E4", "S1"), "x"), "is semantic memory, not episodic"),
        (Merge(S, ("S1", "S1x"), "x"), "MERGE is not allowed for semantic"),
        (CoreReplace("Bob", "Rob"), "does not occur in core memory"),
    ],
)
def test_invalid_operations_are_rejected_and_change_nothing(bank, op, reason):
    bank.apply([Add(S, "fact"), Add(E, "a"), Add(E, "b"), CoreAppend("Name: Alice")])
    bank.apply([Merge(E, ("E2", "E3"), "a and b")])  # E4 retires E2, E3
    before = bank.snapshot()
    with pytest.raises(OperationRejected) as err:
        bank.apply([Add(S, "would be added"), op])
    assert reason in str(err.value)
    assert err.value.rejections[0].index == 1
    assert bank.snapshot() == before  # atomic: the valid ADD before it was not applied either
    assert bank.validate([op])[0].reason in str(err.value)


def test_skip_invalid_applies_the_rest_and_reports(bank):
    r = bank.apply([Add(S, "a"), Update(S, "S7", "x"), Add(S, "b")], skip_invalid=True)
    assert r.created == ("S1", "S2")
    assert [(x.index, x.reason) for x in r.rejected] == [(1, "no entry with id 'S7'")]


def test_operations_in_one_batch_see_each_other(bank):
    # UPDATE of an entry created earlier in the batch, then MERGE of it
    r = bank.apply([Add(E, "a"), Update(E, "E1", "a2"), Add(E, "b"), Merge(E, ("E1", "E2"), "ab")])
    assert r.created == ("E3",) and r.retired == () and r.updated == ()
    assert [(e.id, e.status) for e in bank.entries(include_retired=True)] == [
        ("E1", Status.RETIRED), ("E2", Status.RETIRED), ("E3", Status.ACTIVE)
    ]
    assert bank.get("E1").text == "a2"


def test_core_append_replace_rewrite(bank):
    bank.apply([CoreAppend("Name: Alice")])
    bank.apply([CoreAppend("Lives in Boston")])
    assert bank.core == "Name: Alice\nLives in Boston"
    bank.apply([CoreReplace("Boston", "Denver")])
    assert bank.core == "Name: Alice\nLives in Denver"
    bank.apply([CoreRewrite("Alice, 34, Denver")])
    assert bank.core == "Alice, 34, Denver"
    events = [(h.event, h.old_text, h.new_text) for h in bank.history("core")]
    assert events[2] == ("CORE_REPLACE", "Name: Alice\nLives in Boston", "Name: Alice\nLives in Denver")
    assert [e[0] for e in events] == ["CORE_APPEND", "CORE_APPEND", "CORE_REPLACE", "CORE_REWRITE"]


def test_core_replace_changes_only_the_first_occurrence(bank):
    bank.apply([CoreRewrite("cat; cat")])
    bank.apply([CoreReplace("cat", "dog")])
    assert bank.core == "dog; cat"


def test_core_limit_is_enforced_never_truncated(bank):
    bank.apply([CoreRewrite("x" * (CORE_LIMIT - 3))])
    # "\n" + "ab" = 3 more characters: exactly at the limit is allowed
    bank.apply([CoreAppend("ab")])
    assert len(bank.core) == CORE_LIMIT
    before = bank.snapshot()
    for op in (CoreAppend("c"), CoreRewrite("y" * (CORE_LIMIT + 1)), CoreReplace("ab", "abc")):
        with pytest.raises(OperationRejected, match="over the limit of 5000"):
            bank.apply([op])
    assert bank.snapshot() == before


def test_delete_retires_and_unknown_ids_raise(bank):
    bank.apply([Add(S, "a")])
    bank.delete("S1")
    assert bank.get("S1").status is Status.RETIRED
    assert bank.history("S1")[-1].event == "DELETE"
    with pytest.raises(UnknownEntryError, match="no entry 'S5'"):
        bank.get("S5")
    with pytest.raises(UnknownEntryError):
        bank.delete("S5")
    with pytest.raises(OperationRejected, match="retired"):
        bank.delete("S1")


def test_non_operations_are_rejected(bank):
    with pytest.raises(OperationRejected, match="not a memory operation: dict"):
        bank.apply([{"action": "ADD", "memory": "x"}])
    with pytest.raises(InvalidInputError):
        bank.apply({"action": "ADD"})
    assert len(bank) == 0


def test_owners_are_isolated(store, clock):
    a, b = MemoryBank(store, "a", clock=clock), MemoryBank(store, "b", clock=clock)
    a.apply([Add(S, "alpha secret"), CoreAppend("I am A")])
    assert b.entries() == [] and b.core == ""
    assert b.search("alpha secret") == []
    with pytest.raises(OperationRejected, match="no entry with id 'S1'"):
        b.apply([Update(S, "S1", "stolen")])
    b.apply([Add(S, "beta")])  # b's own ids start at 1 too, but name b's entries
    assert b.get("S1").text == "beta" and a.get("S1").text == "alpha secret"
    assert {e.owner for e in a.entries()} == {"a"}


def test_snapshot_restore_is_exact_and_ids_continue(bank, store, clock):
    bank.apply([Add(E, "a", "2023-01-01"), CoreAppend("core"), Add(S, "s")], session_id="s1")
    state = bank.snapshot()
    bank.apply([Merge(E, ("E1", "E9"), "m")], skip_invalid=True)  # rejected: E9 missing
    bank.apply([Update(S, "S2", "changed"), Add(P, "p"), CoreRewrite("new core")])
    bank.restore(state)
    assert bank.snapshot() == state
    assert bank.apply([Add(S, "after")]).created == ("S3",)  # the id counter was restored too
    # a state restored under another owner in another store behaves identically
    from membuilder.store import InMemoryStore

    other = MemoryBank(InMemoryStore(), "copy", clock=clock)
    other.restore(state)
    assert [e.text for e in other.entries()] == ["a", "s"] and other.core == "core"
    assert {e.owner for e in other.entries()} == {"copy"}


def test_search_filters_by_kind_time_and_status(bank):
    bank.apply(
        [
            Add(E, "hiking trip to the Alps", "2023-05-01"),
            Add(E, "hiking in the rain", "2023-06-10"),
            Add(S, "loves hiking boots"),
            Add(E, "hiking with no date"),
        ]
    )
    ids = lambda hits: sorted(h.entry.id for h in hits)  # noqa: E731
    assert ids(bank.search("hiking")) == ["E1", "E2", "E4", "S3"]
    assert ids(bank.search("hiking", kinds="semantic")) == ["S3"]
    assert ids(bank.search("hiking", time_range=("2023-05-01", "2023-05-31"))) == ["E1"]
    assert ids(bank.search("hiking", time_range=("2023-06-01", None))) == ["E2"]
    bank.apply([Update(E, "E2", "walking in the rain")])
    bank.apply([Merge(E, ("E1", "E4"), "hiking trips")])
    assert ids(bank.search("hiking")) == ["E5", "S3"]
    assert ids(bank.search("walking")) == ["E2"]
    with pytest.raises(InvalidInputError, match="core memory is not searchable"):
        bank.search("x", kinds=["core"])
    with pytest.raises(InvalidInputError, match="k must be a positive"):
        bank.search("x", k=0)


def test_index_survives_reopen_and_restore(bank, store, clock):
    bank.apply([Add(S, "red bicycle")])
    state = bank.snapshot()
    assert [h.entry.id for h in bank.search("bicycle")] == ["S1"]
    bank.apply([Update(S, "S1", "blue car")])
    assert bank.search("bicycle") == []
    bank.restore(state)
    assert [h.entry.id for h in bank.search("bicycle")] == ["S1"]
    fresh = MemoryBank(store, "alice", clock=clock)  # a new object over the same store
    assert [h.entry.text for h in fresh.search("bicycle")] == ["red bicycle"]


def test_a_date_only_end_includes_that_whole_day(bank):
    """Issue 11 item 6: ("2023-05-08", "2023-05-08") is the whole of May 8, not its first instant."""
    from datetime import date

    bank.apply([
        Add(E, "tea at dawn", "2023-05-08T00:00:00"),
        Add(E, "tea at dusk", "2023-05-08T23:59:59"),
        Add(E, "tea the next day", "2023-05-09"),
        Add(E, "tea the night before", "2023-05-07T23:59:59"),
        Add(E, "tea on the day", "2023-05-08"),
    ])
    ids = lambda hits: sorted(h.entry.id for h in hits)  # noqa: E731
    assert ids(bank.search("tea", time_range=("2023-05-08", "2023-05-08"))) == ["E1", "E2", "E5"]
    assert ids(bank.search("tea", time_range=(None, date(2023, 5, 8)))) == ["E1", "E2", "E4", "E5"]
    # a datetime end is exact: noon excludes the evening
    assert ids(bank.search("tea", time_range=(None, "2023-05-08T12:00:00"))) == ["E1", "E4", "E5"]


def test_bad_time_ranges_are_clear_errors(bank):
    bank.apply([Add(E, "tea", "2023-05-08")])
    with pytest.raises(InvalidInputError, match="starts .* after it ends"):
        bank.search("tea", time_range=("2023-05-09", "2023-05-08"))
    with pytest.raises(InvalidInputError, match=r"time_range must be \(start, end\)"):
        bank.search("tea", time_range=("2023-05-09",))
    with pytest.raises(InvalidInputError, match="not an ISO-8601"):
        bank.search("tea", time_range=("yesterday", None))
