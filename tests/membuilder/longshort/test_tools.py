"""Memory tools: schemas validate, execution against a bank, per-tool metrics; DELETE in the bank."""

import json

import jsonschema
import pytest

from membuilder.bank import MemoryBank
from membuilder.longshort.tools import TOOL_NAMES, TOOLS, MemoryTools
from membuilder.operations import Add, Delete, parse_operation
from membuilder.store import InMemoryStore
from membuilder.types import InvalidInputError, MemoryKind, Status


def test_tool_schemas_are_valid_json_schemas_in_openai_shape():
    assert TOOL_NAMES == ("memory_insert", "memory_update", "memory_delete", "memory_search")
    for tool in TOOLS:
        assert tool["type"] == "function" and set(tool["function"]) == {"name", "description", "parameters"}
        jsonschema.Draft202012Validator.check_schema(tool["function"]["parameters"])
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    jsonschema.validate({"content": "x", "time": "2023-05-08"}, params["memory_insert"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"content": "x", "extra": 1}, params["memory_insert"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"query": "x", "k": 0}, params["memory_search"])


def test_tools_execute_and_count():
    bank = MemoryBank(InMemoryStore(), "u")
    tools = MemoryTools(bank, session_id="s1")
    tools.note_source(100)
    r = tools.execute({"name": "memory_insert", "arguments": json.dumps({"content": "Ann has a cat.", "time": "2023-05-08"})})
    assert r.ok and r.output == {"id": "S1"} and bank.get("S1").event_time == "2023-05-08"
    r = tools.execute({"type": "function", "function": {"name": "memory_insert", "arguments": {"content": "Ann likes tea."}}})
    assert r.ok and r.output == {"id": "S2"}
    r = tools.execute({"name": "memory_update", "arguments": {"id": "S1", "content": "Ann has two cats."}})
    assert r.ok and bank.get("S1").text == "Ann has two cats."
    r = tools.execute({"name": "memory_search", "arguments": {"query": "cats", "k": 1}})
    assert r.ok and [h["id"] for h in r.output] == ["S1"]
    r = tools.execute({"name": "memory_delete", "arguments": {"id": "S2"}})
    assert r.ok and r.output == {"retired": ["S2"]} and bank.get("S2").status is Status.RETIRED
    m = tools.summary()
    # written: "Ann has a cat." (14) + "Ann likes tea." (14) by insert, "Ann has two cats." (17) by update
    assert m["tools"]["memory_insert"] == {"calls": 2, "errors": 0, "entries_written": 2, "entries_retired": 0,
                                          "chars_written": 28, "results_returned": 0}
    assert m["tools"]["memory_update"]["chars_written"] == 17
    assert m["tools"]["memory_delete"]["entries_retired"] == 1
    assert m["tools"]["memory_search"]["results_returned"] == 1
    assert m["compression_ratio"] == pytest.approx((28 + 17) / 100)


@pytest.mark.parametrize("call, fragment", [
    ({"name": "memory_forget", "arguments": {}}, "unknown tool"),
    ({"name": "memory_insert", "arguments": "{not json"}, "not valid JSON"),
    ({"name": "memory_insert", "arguments": {}}, "missing argument(s) ['content']"),
    ({"name": "memory_insert", "arguments": {"content": "x", "id": "S1"}}, "unknown argument(s)"),
    ({"name": "memory_insert", "arguments": {"content": "   "}}, "non-empty"),
    ({"name": "memory_search", "arguments": {"query": "x", "k": 500}}, "integer in [1, 50]"),
    ({"name": "memory_delete", "arguments": {"id": "S9"}}, "no entry"),
    ({"name": "memory_update", "arguments": {"id": "S9", "content": "y"}}, "no entry"),
])
def test_bad_calls_are_errors_that_change_nothing(call, fragment):
    bank = MemoryBank(InMemoryStore(), "u")
    bank.apply([Add(MemoryKind.SEMANTIC, "kept")])
    before = bank.snapshot()
    r = MemoryTools(bank).execute(call)
    assert not r.ok and fragment in r.error
    assert bank.snapshot() == before


def test_delete_is_not_an_agent_action_but_the_bank_applies_it_in_a_batch(store):
    with pytest.raises(InvalidInputError, match="not allowed"):
        parse_operation("semantic", {"action": "DELETE", "id": "S1"})
    bank = MemoryBank(store, "u")  # both stores (conftest)
    result = bank.apply([Add(MemoryKind.SEMANTIC, "a"), Delete(MemoryKind.SEMANTIC, "S1"), Add(MemoryKind.SEMANTIC, "b")])
    # created and deleted in one batch: inserted retired, reported neither created nor retired
    assert result.created == ("S2",) and result.retired == () and bank.get("S1").status is Status.RETIRED
    assert [h.event for h in bank.history()] == ["ADD", "DELETE", "ADD"]
    with pytest.raises(Exception, match="is episodic memory|not semantic"):
        bank.apply([Add(MemoryKind.EPISODIC, "e"), Delete(MemoryKind.SEMANTIC, "E3")])
    assert len(bank) == 1  # the refused batch wrote nothing
    # the state with a DELETE round-trips through a snapshot and passes the state checks
    other = MemoryBank(InMemoryStore(), "v")
    other.restore(bank.snapshot())
    assert [(e.id, e.status) for e in other.entries(include_retired=True)] == [
        ("S1", Status.RETIRED), ("S2", Status.ACTIVE)]
