"""Hand-worked cases for the long/short-term agents' parsers (the validity gate)."""

import json

import jsonschema
import pytest

from membuilder.longshort.schema import (
    LONG_TERM_SCHEMA,
    MAX_FACTS,
    SPLITTER_SCHEMA,
    Decision,
    Split,
    is_over_limit,
    parse_decisions,
    parse_split,
    parse_state,
    short_term_schema,
)


def test_split_parses_with_think_block_fence_and_prose():
    raw = ('<think>hmm {"important": ["x"]}</think>Here you go:\n```json\n'
           '{"important": ["Ann adopted a cat named Tom."], "unimportant": ["Ben said hi."], "reason": "r"}\n```')
    p = parse_split(raw)
    assert p.ok and p.value == Split(("Ann adopted a cat named Tom.",), ("Ben said hi.",))


@pytest.mark.parametrize("raw, fragment", [
    ('{"important": ["a"]}', "missing ['unimportant']"),
    ('{"important": ["a"], "unimportant": [], "extra": 1}', "unknown field(s)"),
    ('{"important": "a", "unimportant": []}', "must be a list"),
    ('{"important": [""], "unimportant": []}', "important[0] must be a non-empty string"),
    ('{"important": [3], "unimportant": []}', "important[0]"),
    ('{"important": ["a"], "unimportant": [', "ends inside the JSON object"),
    ("", "empty output"),
    ("<think>only thinking</think>", "nothing but a think-block"),
    ('{"important": ["a"], "important": ["b"], "unimportant": []}', "appears twice"),
])
def test_split_refuses_with_a_named_reason(raw, fragment):
    p = parse_split(raw)
    assert not p.ok and fragment in p.error


def test_split_refuses_more_than_max_facts():
    p = parse_split(json.dumps({"important": ["f"] * (MAX_FACTS + 1), "unimportant": []}))
    assert not p.ok and f"over the limit of {MAX_FACTS}" in p.error


def test_split_never_raises_on_non_text():
    assert not parse_split(None).ok and not parse_split(12).ok


CANDS = (("S1", "S2"), (), ("S3",))


def test_decisions_parse_all_four_actions_in_fact_order():
    raw = json.dumps({"decisions": [
        {"fact": 2, "action": "delete", "id": "S3"},
        {"fact": 0, "action": "UPDATE", "id": "S2", "memory": " Ann has two cats. "},
        {"fact": 1, "action": "ADD", "memory": "Ben likes tea.", "reason": "new"},
    ]})
    p = parse_decisions(raw, CANDS)
    assert p.ok
    assert p.value == (Decision(0, "UPDATE", "Ann has two cats.", "S2"), Decision(1, "ADD", "Ben likes tea."),
                       Decision(2, "DELETE", None, "S3"))


@pytest.mark.parametrize("decisions, fragment", [
    ([{"fact": 0, "action": "NOOP"}, {"fact": 1, "action": "NOOP"}], "no decision for fact(s) [2]"),
    ([{"fact": 0, "action": "NOOP"}, {"fact": 0, "action": "NOOP"}], "fact 0 has a second decision"),
    ([{"fact": 3, "action": "NOOP"}], "must be an integer in [0, 3)"),
    ([{"fact": True, "action": "NOOP"}], "must be an integer"),
    ([{"fact": 1, "action": "UPDATE", "id": "S1", "memory": "x"}], "was not shown with fact 1"),
    ([{"fact": 0, "action": "DELETE", "id": "S9"}], "was not shown with fact 0"),
    ([{"fact": 0, "action": "MERGE", "id": "S1"}], "action must be one of"),
    ([{"fact": 0, "action": "ADD"}], "missing ['memory']"),
    ([{"fact": 0, "action": "NOOP", "memory": "x"}], "unknown field(s)"),
    ([{"fact": 0, "action": "DELETE", "id": "S1"}, {"fact": 2, "action": "NOOP"},
      {"fact": 1, "action": "ADD", "memory": "m"}, {"fact": 9, "action": "NOOP"}], "integer in [0, 3)"),
])
def test_decisions_refuse_with_a_named_reason(decisions, fragment):
    p = parse_decisions(json.dumps({"decisions": decisions}), CANDS)
    assert not p.ok and fragment in p.error


def test_one_id_cannot_be_the_target_of_two_decisions():
    cands = (("S1",), ("S1",))
    raw = json.dumps({"decisions": [{"fact": 0, "action": "UPDATE", "id": "S1", "memory": "a"},
                                    {"fact": 1, "action": "DELETE", "id": "S1"}]})
    p = parse_decisions(raw, cands)
    assert not p.ok and "already the target of the decision on fact 0" in p.error


def test_no_facts_takes_an_empty_list_only():
    assert parse_decisions('{"decisions": []}', ()).ok
    assert not parse_decisions('{"decisions": [{"fact": 0, "action": "NOOP"}]}', ()).ok


def test_state_within_limit_over_limit_and_bad():
    assert parse_state('{"state": " ab "}', 2).value == "ab"  # stripped before the bound: 2 <= 2
    over = parse_state('{"state": "abc"}', 2)
    assert not over.ok and is_over_limit(over) and over.value == "abc" and "3 characters" in over.error
    bad = parse_state('{"state": 3}', 2)
    assert not bad.ok and not is_over_limit(bad)
    assert not parse_state('{"state": "\\ud83d"}', 10).ok  # a lone surrogate cannot be stored


def test_schemas_are_valid_and_agree_with_the_parsers():
    for schema in (SPLITTER_SCHEMA, LONG_TERM_SCHEMA, short_term_schema(10)):
        jsonschema.Draft202012Validator.check_schema(schema)
    good = {"decisions": [{"fact": 0, "action": "ADD", "memory": "m"}]}
    jsonschema.validate(good, LONG_TERM_SCHEMA)
    assert parse_decisions(json.dumps(good), ((),)).ok
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"state": "x" * 11}, short_term_schema(10))
