"""apply_agent_outputs: per-agent validity gate, one transaction, builder vs reward application."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from membuilder.agents.apply import apply_agent_outputs
from membuilder.agents.records import CompressionRecord
from membuilder.bank import MemoryBank
from membuilder.operations import Add, CoreAppend, CoreReplace, CoreRewrite
from membuilder.store import InMemoryStore
from membuilder.types import MemoryKind

CORE, EPI, SEM, PRO = MemoryKind.CORE, MemoryKind.EPISODIC, MemoryKind.SEMANTIC, MemoryKind.PROCEDURAL


def _bank(clock, core_limit=5000):
    bank = MemoryBank(InMemoryStore(), "o", clock=clock, core_limit=core_limit)
    bank.apply([CoreAppend("Ann likes tea."), Add("semantic", "Max is a cat."), Add("episodic", "old event")])
    return bank  # S1, E2


def _ops(*items):
    return json.dumps({"operations": list(items)})


def test_all_valid_agents_are_applied_in_one_batch(clock):
    bank = _bank(clock)
    seq_before = len(bank.history())
    out = apply_agent_outputs(bank, {
        "core": '{"action": "REPLACE", "old_text": "tea", "new_text": "green tea"}',
        "episodic": _ops({"action": "ADD", "memory": "Ann moved.", "time": "2023-05-07"}),
        "semantic": _ops({"action": "UPDATE", "id": "S1", "new_memory": "Max is a dog."}),
        "procedural": _ops()}, session_id="s2")
    assert all(a.valid and a.error is None and a.rejected == () for a in out.agents.values())
    assert out.result.created == ("E3",) and out.result.updated == ("S1",) and out.result.core_changed
    assert out.core_before == "Ann likes tea." and out.core_after == bank.core == "Ann likes green tea."
    assert out.agents[CORE].proposed_core == "Ann likes green tea."
    assert len(bank.history()) == seq_before + 3  # core replace, ADD, UPDATE: nothing doubled


def test_builder_mode_keeps_an_agents_good_operations_but_marks_it_invalid(clock):
    bank = _bank(clock)
    out = apply_agent_outputs(bank, {
        "semantic": _ops({"action": "UPDATE", "id": "S99", "new_memory": "x"},
                         {"action": "ADD", "memory": "Ann has a bike."})}, session_id="s2")
    sem = out.agents[SEM]
    assert not sem.valid and sem.error is None
    assert sem.invalid_reason == "the bank rejects operations[0] UPDATE: no entry with id 'S99'"
    assert sem.applied == (Add("semantic", "Ann has a bike."),)
    assert sem.rejected == ("operations[0] UPDATE: no entry with id 'S99'",)
    assert [e.text for e in bank.entries("semantic")] == ["Max is a cat.", "Ann has a bike."]


def test_reward_mode_drops_an_invalid_agent_whole_and_applies_the_others(clock):
    bank = _bank(clock)
    out = apply_agent_outputs(bank, {
        "semantic": _ops({"action": "UPDATE", "id": "E2", "new_memory": "wrong kind"},
                         {"action": "ADD", "memory": "Ann has a bike."}),
        "episodic": _ops({"action": "ADD", "memory": "Ann rode her bike."}),
        "procedural": '{"operations": [{"action": "SKIP"}]}'}, session_id="s2", drop_invalid_agents=True)
    assert not out.agents[SEM].valid and out.agents[SEM].applied == ()
    assert out.agents[SEM].rejected == ("operations[0] UPDATE: entry 'E2' is episodic memory, not semantic",)
    assert not out.agents[PRO].valid and out.agents[PRO].error.startswith("unparsable answer: invalid procedural")
    assert out.agents[EPI].valid and out.result.created == ("E3",)
    assert [e.text for e in bank.entries("semantic")] == ["Max is a cat."]


def test_core_over_the_limit_is_invalid_with_or_without_compression(clock):
    # "Ann likes tea." is 14 chars; APPEND of 10 gives 14 + 1 + 10 = 25 > 20
    bank = _bank(clock, core_limit=20)
    app = '{"action": "APPEND", "content": "' + "b" * 10 + '"}'
    out = apply_agent_outputs(bank, {"core": app}, session_id="s2", drop_invalid_agents=True)
    core = out.agents[CORE]
    assert not core.valid and core.applied == () and len(core.proposed_core) == 25
    assert core.error == "core change over the limit (compression is off)"
    assert core.rejected[0] == "the core change would make the block 25 characters, over the limit of 20"
    assert bank.core == "Ann likes tea."
    calls = []

    def compress(proposed):
        calls.append(proposed)
        return CompressionRecord([], "raw", CoreRewrite("Ann: tea, b."), None, len(proposed))

    out = apply_agent_outputs(bank, {"core": app}, session_id="s2", compress=compress)
    assert calls == ["Ann likes tea.\n" + "b" * 10]
    assert not out.agents[CORE].valid and out.agents[CORE].applied == (CoreRewrite("Ann: tea, b."),)
    assert bank.core == "Ann: tea, b."


def test_backend_errors_and_missing_output_are_invalid_and_apply_nothing(clock):
    bank = _bank(clock)
    out = apply_agent_outputs(bank, {"episodic": None}, errors={"semantic": "RuntimeError: down"},
                              session_id="s2", drop_invalid_agents=True)
    assert set(out.agents) == {EPI, SEM}
    assert out.agents[EPI].error == "unparsable answer: no output" and not out.agents[EPI].valid
    assert out.agents[SEM].error == "RuntimeError: down" and not out.agents[SEM].valid
    assert out.result.created == () and not out.result.core_changed


def test_agents_that_fail_only_together_are_invalid(clock):
    bank = _bank(clock)  # next id is 3
    # alone, semantic's ADD would be S3 and its UPDATE of S3 valid; together, episodic's ADD takes
    # id 3 first (E3), so semantic's ADD becomes S4 and UPDATE S3 names nothing
    out = apply_agent_outputs(bank, {
        "episodic": _ops({"action": "ADD", "memory": "Ann moved."}),
        "semantic": _ops({"action": "ADD", "memory": "Ann has a bike."},
                         {"action": "UPDATE", "id": "S3", "new_memory": "Ann has a red bike."})},
        session_id="s2", drop_invalid_agents=True)
    assert out.agents[EPI].valid and not out.agents[SEM].valid
    assert "rejected together" in out.agents[SEM].invalid_reason
    assert out.result.created == ("E3",) and [e.text for e in bank.entries("semantic")] == ["Max is a cat."]


def test_proposed_core_follows_the_bank_rules(clock):
    bank = _bank(clock)
    ops = [CoreAppend("x"), CoreReplace("absent", "y"), CoreReplace("x", "zz"), Add("semantic", "ignored")]
    assert bank.proposed_core(ops) == "Ann likes tea.\nzz"
    assert bank.proposed_core([CoreRewrite("")]) == ""


_OP = st.one_of(
    st.builds(lambda t: {"action": "ADD", "memory": t}, st.sampled_from(["a b", "c", "d e f"])),
    st.builds(lambda i: {"action": "UPDATE", "id": i, "new_memory": "u"}, st.sampled_from(["S1", "E2", "S9", "E3"])),
    st.builds(lambda ids: {"action": "MERGE", "ids": ids, "new_memory": "m"},
              st.lists(st.sampled_from(["E2", "E3", "S1"]), min_size=2, max_size=2, unique=True)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_OP, max_size=3), st.lists(_OP, max_size=3))
def test_validity_equals_the_bank_accepting_the_agent_alone(clock, epi, sem):
    """Property: valid <=> parse ok and bank.validate(ops) == [] on the state before; invalid
    agents change nothing in reward mode, and the bank equals applying the valid agents only."""
    bank = _bank(clock)
    raws = {"episodic": _ops(*epi), "semantic": _ops(*sem)}
    from membuilder.agents.parsing import parse_agent_output
    expect = {}
    for kind, raw in raws.items():
        parsed = parse_agent_output(kind, raw)
        expect[kind] = parsed.ok and not bank.validate(parsed.operations)
    out = apply_agent_outputs(bank, raws, session_id="s", drop_invalid_agents=True)
    for kind in raws:
        if not expect[kind]:
            assert not out.agents[MemoryKind(kind)].valid and out.agents[MemoryKind(kind)].applied == ()
    assert not out.result.rejected
    ref = _bank(clock)
    batch = [op for k in ("episodic", "semantic") if out.agents[MemoryKind(k)].valid
             for op in parse_agent_output(k, raws[k]).operations]
    ref.apply(batch, session_id="s")
    texts = sorted((e.id, e.text, e.status.value) for e in bank.entries(include_retired=True))
    assert texts == sorted((e.id, e.text, e.status.value) for e in ref.entries(include_retired=True))


def test_bad_outputs_argument_is_a_clear_error(clock):
    with pytest.raises(ValueError, match="outputs must map"):
        apply_agent_outputs(_bank(clock), ["core"], session_id="s")
    with pytest.raises(ValueError, match="unknown memory kind"):
        apply_agent_outputs(_bank(clock), {"cores": "{}"}, session_id="s")
