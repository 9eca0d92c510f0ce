"""The agent output parser: wrapping removed in a fixed, bounded way; the answer itself is strict."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from membuilder.agents import parse_agent_output
from membuilder.operations import Add, CoreAppend, CoreReplace, CoreRewrite, Merge, Skip, Update, parse_operations
from membuilder.types import MemoryKind

SEM = {"operations": [{"action": "ADD", "memory": "Caroline lives in Boston.", "time": "2023-05-08"},
                      {"action": "SKIP", "reason": "already stored as S2"}]}
SEM_OPS = (Add(MemoryKind.SEMANTIC, "Caroline lives in Boston.", "2023-05-08"),
           Skip(MemoryKind.SEMANTIC, "already stored as S2"))


def test_plain_json_parses_to_typed_operations():
    out = parse_agent_output("semantic", json.dumps(SEM))
    assert out.ok and out.error is None
    assert out.operations == SEM_OPS


def test_core_single_operation_and_noop():
    out = parse_agent_output("core", '{"action": "REPLACE", "old_text": "Boston", "new_text": "Denver"}')
    assert out.operations == (CoreReplace("Boston", "Denver"),)
    empty = parse_agent_output("core", '{"operations": []}')
    assert empty.ok and empty.operations == ()


def test_think_blocks_and_fences_are_removed():
    decoy = '{"operations": [{"action": "ADD", "memory": "a decoy inside thinking"}]}'
    raw = f"<think>I could answer {decoy}\nbut no.</think>\nHere you go:\n```json\n{json.dumps(SEM, indent=2)}\n```\n"
    assert parse_agent_output("semantic", raw).operations == SEM_OPS
    # chat templates that open <think> in the prompt leave only the closing tag in the output
    assert parse_agent_output("semantic", f"reasoning {decoy} </think> {json.dumps(SEM)}").operations == SEM_OPS


def test_unterminated_think_is_dropped_and_reported():
    out = parse_agent_output("semantic", f'<think>let me see {json.dumps(SEM)} hmm, and then')
    assert not out.ok
    assert "think" in out.error


def test_first_balanced_object_is_taken_and_stray_prose_braces_ignored():
    raw = ('I use {curly braces} in prose and a lone { too. '
           + json.dumps(SEM) + ' and later {"operations": []}')
    assert parse_agent_output("semantic", raw).operations == SEM_OPS


def test_braces_inside_strings_do_not_end_the_object():
    obj = {"operations": [{"action": "ADD", "memory": 'She wrote "}{" and \\"quoted\\" text }'}]}
    out = parse_agent_output("semantic", "prefix " + json.dumps(obj) + " suffix")
    assert out.ok and out.operations[0].memory == obj["operations"][0]["memory"]


def test_raw_newlines_inside_strings_are_accepted():
    # models (and xgrammar-constrained decoding) write multi-line text with literal newlines
    raw = '{"action": "APPEND", "content": "Ann lives in Oslo.\nAnn loves skiing."}'
    assert "\n" in raw and "\\n" not in raw
    assert parse_agent_output("core", raw).operations == (CoreAppend("Ann lives in Oslo.\nAnn loves skiing."),)
    fenced = "```json\n" + raw.replace("Oslo.", "Oslo.\n```") + "\n```"  # a fence line inside the string survives
    assert parse_agent_output("core", fenced).operations == (CoreAppend("Ann lives in Oslo.\n```\nAnn loves skiing."),)


def test_truncated_answer_is_an_error_and_inner_objects_are_not_used():
    # the cut answer holds a complete inner core operation: it must not be taken as the answer
    raw = '{"operations": [{"action": "APPEND", "content": "likes tea"}, {"action": "REP'
    out = parse_agent_output("core", raw)
    assert not out.ok and "cut off" in out.error and out.operations == ()


def test_malformed_object_is_skipped_whole():
    # trailing comma: invalid JSON; its inner APPEND must not be parsed as the core answer
    raw = '{"operations": [{"action": "APPEND", "content": "x"},]}'
    out = parse_agent_output("core", raw)
    assert not out.ok and "malformed" in out.error


def test_duplicate_keys_are_refused():
    out = parse_agent_output("core", '{"action": "APPEND", "action": "REWRITE", "content": "x"}')
    assert not out.ok and "twice" in out.error


def test_wrong_action_for_kind_names_the_problem():
    out = parse_agent_output(
        "semantic", '{"operations": [{"action": "MERGE", "ids": ["S1", "S2"], "new_memory": "x"}]}')
    assert not out.ok
    assert "operations[0]" in out.error and "MERGE" in out.error and "semantic" in out.error


def test_empty_and_missing_outputs():
    assert parse_agent_output("episodic", "").error == "empty output"
    assert parse_agent_output("episodic", None).error == "no output"
    assert "no JSON object" in parse_agent_output("episodic", "I have nothing to add.").error
    assert not parse_agent_output("episodic", "<think>only thinking</think>").ok


# --- property-based -----------------------------------------------------------------------------

_words = st.text(alphabet="abcdefghij klmnop,.'-", min_size=1, max_size=30).filter(lambda s: s.strip())
_dates = st.dates().map(lambda d: d.isoformat())
_ids = st.from_regex(r"[ESP][1-9][0-9]{0,2}", fullmatch=True)


def _ops(kind: MemoryKind):
    add = st.builds(lambda m, t: {"action": "ADD", "memory": m, **({"time": t} if t else {})},
                    _words, st.none() | _dates)
    update = st.builds(lambda i, m: {"action": "UPDATE", "id": i, "new_memory": m}, _ids, _words)
    merge = st.builds(lambda ids, m: {"action": "MERGE", "ids": ids, "new_memory": m},
                      st.lists(_ids, min_size=2, max_size=4, unique=True), _words)
    skip = st.builds(lambda r: {"action": "SKIP", "reason": r}, _words)
    return {MemoryKind.EPISODIC: add | update | merge, MemoryKind.SEMANTIC: add | update | skip,
            MemoryKind.PROCEDURAL: add | update}[kind]


_core_op = (st.builds(lambda c: {"action": "APPEND", "content": c}, _words)
            | st.builds(lambda a, b: {"action": "REPLACE", "old_text": a, "new_text": b}, _words, _words)
            | st.builds(lambda c: {"action": "REWRITE", "content": c}, _words))


@st.composite
def agent_answers(draw):
    kind = draw(st.sampled_from(list(MemoryKind)))
    if kind is MemoryKind.CORE:
        data = draw(_core_op | st.builds(lambda ops: {"operations": ops}, st.lists(_core_op, max_size=3)))
    else:
        data = {"operations": draw(st.lists(_ops(kind), max_size=5))}
    return kind, data


_prose = st.text(alphabet="abcdefgh XYZ.:!?'\"\n\t`<>/-", max_size=40)  # no braces: prose holds no object
_think_junk = st.text(alphabet='abc {}[]":,\n', max_size=40).filter(lambda s: "</think>" not in s)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(agent_answers(), _prose, _prose, st.booleans(), st.booleans(), _think_junk,
       st.sampled_from([None, 2]))
def test_wrapped_valid_answer_parses_to_the_same_operations(answer, before, after, fence, think, junk, indent):
    kind, data = answer
    text = json.dumps(data, indent=indent)
    if fence:
        text = f"```json\n{text}\n```"
    raw = f"{before}{text}{after}"
    if think:
        raw = f"<think>{junk}</think>{raw}"
    out = parse_agent_output(kind, raw)
    assert out.ok, out.error
    assert list(out.operations) == parse_operations(kind, data)


@settings(max_examples=150, deadline=None)
@given(agent_answers(), st.data())
def test_every_strict_prefix_of_an_answer_is_an_error_not_an_exception(answer, data):
    kind, obj = answer
    text = json.dumps(obj)
    cut = data.draw(st.integers(min_value=0, max_value=len(text) - 1))
    out = parse_agent_output(kind, text[:cut])
    assert not out.ok and out.error and out.operations == ()


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(MemoryKind)), st.text(alphabet='{}[]":, actionADDmemory<think>/`\n', max_size=80))
def test_arbitrary_text_never_raises(kind, raw):
    out = parse_agent_output(kind, raw)
    assert out.ok == (out.error is None)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([MemoryKind.EPISODIC, MemoryKind.SEMANTIC, MemoryKind.PROCEDURAL]),
       st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                    max_leaves=10))
def test_arbitrary_json_values_in_operations_never_raise(kind, value):
    raw = json.dumps({"operations": [value]})
    out = parse_agent_output(kind, raw)
    assert out.ok == (out.error is None)


def test_all_typed_operation_kinds_round_trip():
    cases = {
        "core": ('{"action": "REWRITE", "content": ""}', (CoreRewrite(""),)),
        "episodic": ('{"operations": [{"action": "MERGE", "ids": ["E1", "E2"], "new_memory": "m", "time": "2023-05-08"},'
                     ' {"action": "UPDATE", "id": "E3", "new_memory": "u"}]}',
                     (Merge(MemoryKind.EPISODIC, ("E1", "E2"), "m", "2023-05-08"),
                      Update(MemoryKind.EPISODIC, "E3", "u"))),
        "procedural": ('{"operations": [{"action": "add", "memory": "Boil water, then add pasta."}]}',
                       (Add(MemoryKind.PROCEDURAL, "Boil water, then add pasta."),)),
    }
    for kind, (raw, ops) in cases.items():
        assert parse_agent_output(kind, raw).operations == ops
    assert parse_agent_output("core", '{"action": "APPEND", "content": "x"}').operations == (CoreAppend("x"),)
