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


# --- hostile model output (issue 11, items 7-9) ------------------------------------------------


def test_lone_surrogate_makes_the_output_invalid():
    # "\ud83d" is half of an emoji's surrogate pair: valid JSON escape, no valid Unicode text
    for raw in ('{"operations": [{"action": "ADD", "memory": "hi \\ud83d"}]}',
                '{"operations": [{"action": "ADD", "memory": "x", "time": "2023-05-08\\ud83d"}]}',
                '{"operations": [{"action": "MERGE", "ids": ["E1", "E\\udc00"], "new_memory": "m"}]}'):
        out = parse_agent_output("episodic", raw)
        assert not out.ok and "lone surrogate" in out.error and "operations[0]" in out.error, out.error
    out = parse_agent_output("core", '{"action": "APPEND", "content": "\\ud83d"}')
    assert not out.ok and "'content' is not valid Unicode" in out.error
    # a proper pair is one character and passes
    assert parse_agent_output("core", '{"action": "APPEND", "content": "\\ud83d\\ude00"}').operations == (
        CoreAppend("\U0001F600"),)


def test_huge_integer_and_overflowing_time_are_errors_not_exceptions():
    huge = "9" * 5000  # past Python's 4,300-digit int conversion limit: json.loads raises ValueError
    out = parse_agent_output("episodic", '{"operations": [], "reason": %s}' % huge)
    assert not out.ok and "malformed" in out.error and "4300" in out.error
    assert len(out.error) < 300  # the digits are not quoted back
    # a valid ISO-8601 time whose UTC instant falls before year 1: astimezone raises OverflowError
    out = parse_agent_output(
        "episodic", '{"operations": [{"action": "ADD", "memory": "x", "time": "0001-01-01T00:00:00+01:00"}]}')
    assert not out.ok and "out of range once converted to UTC" in out.error
    # the same in the year-9999 direction
    out = parse_agent_output(
        "semantic", '{"operations": [{"action": "UPDATE", "id": "S1", "new_memory": "x", '
                    '"time": "9999-12-31T23:59:59-01:00"}]}')
    assert not out.ok and "out of range" in out.error


def test_error_messages_quote_a_bounded_excerpt():
    long_action = "Z" * 100_000
    out = parse_agent_output("semantic", json.dumps({"operations": [{"action": long_action}]}))
    assert not out.ok and "is not allowed" in out.error and len(out.error) < 400
    out = parse_agent_output("semantic", json.dumps({"operations": [], "x" * 50_000: 1}))
    assert not out.ok and "unknown field" in out.error and len(out.error) < 400


def test_think_stripping_is_linear_on_many_unclosed_tags():
    # 16,000 unclosed tags (112 kB) took 18 s with the regex; the one-pass scan is milliseconds.
    # No timing threshold: the work is counted instead, through the tags the scanner visits.
    from membuilder import thinking

    calls = []
    real = thinking._TAG

    class CountingTag:
        def finditer(self, text):
            calls.append(len(text))
            return real.finditer(text)

    raw = "<think>" * 16_000 + '{"operations": []}'
    thinking._TAG = CountingTag()
    try:
        out = parse_agent_output("episodic", raw)
    finally:
        thinking._TAG = real
    assert calls == [len(raw)]  # one scan over the text, not one per tag
    assert not out.ok and "unterminated <think>" in out.error


# hypothesis leaves surrogates out of text by default: add some, halves of pairs included
_any_text = st.text(alphabet=st.characters(codec=None) | st.sampled_from(["\ud83d", "\ude00", "\udfff"]),
                    min_size=1, max_size=12).filter(str.strip)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["core", "episodic", "semantic"]), _any_text, _any_text)
def test_an_operation_is_accepted_exactly_when_its_text_is_storable(kind, a, b):
    # st.characters(codec=None) includes lone surrogates; json.dumps escapes them as \udXXX
    op = {"core": {"action": "REPLACE", "old_text": a, "new_text": b},
          "episodic": {"action": "MERGE", "ids": [a, a + "x"], "new_memory": b},
          "semantic": {"action": "UPDATE", "id": a, "new_memory": b}}[kind]
    out = parse_agent_output(kind, json.dumps({"operations": [op]}))
    # JSON joins an escaped high + low surrogate into one character: judge the text as decoded
    a, b = json.loads(json.dumps(a)), json.loads(json.dumps(b))
    assert out.ok == (out.error is None) == (_encodable(a) and _encodable(b)), out.error
