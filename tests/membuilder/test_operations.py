import pytest

from membuilder.operations import (
    Add,
    CoreAppend,
    CoreReplace,
    Merge,
    Skip,
    Update,
    operation_to_dict,
    parse_operation,
    parse_operations,
)
from membuilder.types import InvalidInputError, MemoryKind


def test_parse_each_allowed_action():
    assert parse_operation("core", {"action": "append", "content": "Likes tea"}) == CoreAppend("Likes tea")
    assert parse_operation("core", {"action": "REPLACE", "old_text": "tea", "new_text": "coffee"}) == CoreReplace(
        "tea", "coffee"
    )
    assert parse_operation("episodic", {"action": "ADD", "memory": "Ran a 5k", "time": "2023-05-08"}) == Add(
        MemoryKind.EPISODIC, "Ran a 5k", "2023-05-08"
    )
    assert parse_operation("semantic", {"action": "UPDATE", "id": "S3", "new_memory": "x"}) == Update(
        MemoryKind.SEMANTIC, "S3", "x"
    )
    assert parse_operation("episodic", {"action": "MERGE", "ids": ["E1", "E2"], "new_memory": "y"}) == Merge(
        MemoryKind.EPISODIC, ("E1", "E2"), "y"
    )
    assert parse_operation("semantic", {"action": "SKIP", "reason": "nothing new"}) == Skip(
        MemoryKind.SEMANTIC, "nothing new"
    )


@pytest.mark.parametrize(
    "kind, data, message",
    [
        ("semantic", {"action": "MERGE", "ids": ["S1", "S2"], "new_memory": "x"}, "not allowed for semantic"),
        ("procedural", {"action": "SKIP"}, "not allowed for procedural"),
        ("episodic", {"action": "SKIP"}, "not allowed for episodic"),
        ("core", {"action": "ADD", "memory": "x"}, "not allowed for core"),
        ("episodic", {"memory": "x"}, "missing a string 'action'"),
        ("episodic", {"action": "ADD"}, "missing field(s) ['memory']"),
        ("episodic", {"action": "ADD", "memory": 42}, "'memory' must be a string"),
        ("episodic", {"action": "ADD", "memory": "   "}, "non-empty"),
        ("episodic", {"action": "ADD", "memory": "x", "importance": 3}, "unknown field(s) ['importance']"),
        ("episodic", {"action": "ADD", "memory": "x", "time": "last Tuesday"}, "not an ISO-8601"),
        ("episodic", {"action": "MERGE", "ids": "E1", "new_memory": "x"}, "'ids' must be a list"),
        ("episodic", {"action": "MERGE", "ids": ["E1"], "new_memory": "x"}, "at least two"),
        ("episodic", {"action": "MERGE", "ids": ["E1", "E1"], "new_memory": "x"}, "twice"),
        ("semantic", ["ADD"], "must be a JSON object"),
        ("memes", {"action": "ADD", "memory": "x"}, "unknown memory kind 'memes'"),
    ],
)
def test_malformed_operations_are_rejected_with_a_clear_message(kind, data, message):
    with pytest.raises(InvalidInputError) as err:
        parse_operation(kind, data)
    assert message in str(err.value)


def test_parse_operations_names_the_bad_index_and_accepts_empty_lists():
    assert parse_operations("semantic", {"operations": []}) == []
    with pytest.raises(InvalidInputError, match=r"operations\[1\]: UPDATE operation is missing"):
        parse_operations(
            "semantic", {"operations": [{"action": "ADD", "memory": "a"}, {"action": "UPDATE", "id": "S1"}]}
        )
    with pytest.raises(InvalidInputError, match="missing the 'operations' list"):
        parse_operations("episodic", {"action": "ADD", "memory": "a"})
    # core answers with a single operation object
    assert parse_operations("core", {"action": "REWRITE", "content": ""})[0].content == ""


def test_typed_operations_validate_their_fields_too():
    with pytest.raises(InvalidInputError):
        Add("episodic", None)
    with pytest.raises(InvalidInputError, match="core memory takes"):
        Add("core", "x")
    with pytest.raises(InvalidInputError):
        CoreAppend("")


def test_operation_to_dict_round_trips():
    for kind, data in [
        ("episodic", {"action": "MERGE", "ids": ["E1", "E4"], "new_memory": "m", "time": "2023-05-08T13:56:00"}),
        ("semantic", {"action": "SKIP", "reason": "dup"}),
        ("core", {"action": "REPLACE", "old_text": "a", "new_text": ""}),
    ]:
        assert operation_to_dict(parse_operation(kind, data)) == data


def test_texts_must_be_valid_unicode_and_times_in_range():
    # a lone surrogate would pass here and fail at the SQLite write, losing the whole batch
    with pytest.raises(InvalidInputError, match="'memory' is not valid Unicode: lone surrogate"):
        parse_operation("episodic", {"action": "ADD", "memory": "ok \ud83d"})
    with pytest.raises(InvalidInputError, match="'new_text' is not valid Unicode"):
        parse_operation("core", {"action": "REPLACE", "old_text": "a", "new_text": "\udfff"})
    with pytest.raises(InvalidInputError, match="'reason' is not valid Unicode"):
        parse_operation("semantic", {"action": "SKIP", "reason": "\ud800"})
    with pytest.raises(InvalidInputError, match="out of range once converted to UTC"):
        Add("episodic", "x", "0001-01-01T00:30:00+01:00")
    with pytest.raises(InvalidInputError, match="not an ISO-8601"):
        Add("episodic", "x", "2023-05-08T" + "1" * 100)
