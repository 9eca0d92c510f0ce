"""JSON schemas of the four agents' answers, one per kind, mirroring `membuilder.operations`.

They serve two purposes: the prompt shows the exact answer format, and a server that supports
constrained decoding (`response_format={"type": "json_schema", ...}`, e.g. `vllm serve`) can be
made to emit only answers of that shape. The schema is a necessary condition, not the gate:
`parse_agent_output` (which uses `membuilder.operations.parse_operations`) decides validity.
Known differences. The parser is stricter on: whitespace-only text (passes `minLength`), dates
that do not exist (2023-02-30 matches the time pattern), and repeated MERGE ids (the schema has no
`uniqueItems`: vLLM's xgrammar backend refuses schemas that use it). The schema is stricter on: lower-case
action names and ISO forms outside the pattern (a time zone, a space before the time), which the
parser accepts. So an answer decoded under the schema can still fail the parser only in the first
three ways.
"""

from __future__ import annotations

import copy

from membuilder.types import CORE_LIMIT, MemoryKind

# The time field of ADD / UPDATE / MERGE: an ISO-8601 date (years 1000-9999), optionally with a time
# of day. Months and days are bounded so that constrained decoding cannot produce "2023-22-41"
# (a tiny random model under the schema did); only days past a month's end (02-30) get through.
TIME_PATTERN = (r"^[1-9]\d{3}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
                r"(T([01]\d|2[0-3]):[0-5]\d(:[0-5]\d)?)?$")


def _text(*, allow_empty: bool = False) -> dict:
    return {"type": "string"} if allow_empty else {"type": "string", "minLength": 1}


# No "description" fields: the prompts explain every field next to the schema, and a lean schema
# keeps the prompts short.
_REASON = {"type": "string"}
_TIME = {"type": "string", "pattern": TIME_PATTERN}
_ID = {"type": "string", "minLength": 1}


def _op(action: str, properties: dict[str, dict], required: tuple[str, ...]) -> dict:
    return {
        "type": "object",
        "properties": {"action": {"type": "string", "enum": [action]}, **properties, "reason": _REASON},
        "required": ["action", *required],
        "additionalProperties": False,
    }


_OPERATION_SCHEMAS: dict[str, dict] = {
    "APPEND": _op("APPEND", {"content": _text()}, ("content",)),
    "REPLACE": _op("REPLACE", {"old_text": _text(), "new_text": _text(allow_empty=True)}, ("old_text", "new_text")),
    "REWRITE": _op("REWRITE", {"content": _text(allow_empty=True)}, ("content",)),
    "ADD": _op("ADD", {"memory": _text(), "time": _TIME}, ("memory",)),
    "UPDATE": _op("UPDATE", {"id": _ID, "new_memory": _text(), "time": _TIME}, ("id", "new_memory")),
    # no "uniqueItems": vLLM refuses schemas with it ("Unimplemented keys" in xgrammar); the parser
    # refuses a repeated id instead
    "MERGE": _op("MERGE", {"ids": {"type": "array", "items": _ID, "minItems": 2},
                           "new_memory": _text(), "time": _TIME}, ("ids", "new_memory")),
    "SKIP": _op("SKIP", {}, ()),
}

# Actions in the order the prompts list them.
ACTION_ORDER: dict[MemoryKind, tuple[str, ...]] = {
    MemoryKind.CORE: ("APPEND", "REPLACE", "REWRITE"),
    MemoryKind.EPISODIC: ("ADD", "UPDATE", "MERGE"),
    MemoryKind.SEMANTIC: ("ADD", "UPDATE", "SKIP"),
    MemoryKind.PROCEDURAL: ("ADD", "UPDATE"),
}


def operation_schema(action: str) -> dict:
    """The JSON schema of one operation object, e.g. `operation_schema("MERGE")`."""
    try:
        return copy.deepcopy(_OPERATION_SCHEMAS[action])
    except KeyError:
        raise ValueError(f"unknown action {action!r}; expected one of {sorted(_OPERATION_SCHEMAS)}") from None


def agent_schema(kind: MemoryKind | str) -> dict:
    """The JSON schema of one agent's whole answer.

    core: one operation object, or `{"operations": [...]}` (a list of core operations; the empty
    list is the no-change answer). Other kinds: `{"operations": [...]}`.
    """
    kind = MemoryKind.parse(kind)
    refs = [{"$ref": f"#/$defs/{a}"} for a in ACTION_ORDER[kind]]
    wrapper = {
        "type": "object",
        "properties": {"operations": {"type": "array", "items": {"anyOf": refs}}, "reason": _REASON},
        "required": ["operations"],
        "additionalProperties": False,
    }
    # the operation schemas are defined once and referenced, so the core schema (which allows an
    # operation at the top or in a list) does not spell them out twice
    body = {"anyOf": [*copy.deepcopy(refs), wrapper]} if kind is MemoryKind.CORE else wrapper
    return {"$defs": {a: operation_schema(a) for a in ACTION_ORDER[kind]}, **body}


def compression_schema(core_limit: int = CORE_LIMIT) -> dict:
    """The answer of the core compression step: one REWRITE whose content fits the limit."""
    schema = operation_schema("REWRITE")
    schema["properties"]["content"]["maxLength"] = core_limit
    return schema


def response_format(kind: MemoryKind | str, *, compression: bool = False,
                    core_limit: int = CORE_LIMIT) -> dict:
    """`response_format` for an OpenAI-compatible chat request constrained to the agent's schema.

    `strict` is False because OpenAI's strict mode needs every property listed as required and an
    object at the root; servers that do grammar-constrained decoding (vLLM) enforce it anyway.
    """
    kind = MemoryKind.parse(kind)
    if compression:
        schema, name = compression_schema(core_limit), "membuilder_core_compression"
    else:
        schema, name = agent_schema(kind), f"membuilder_{kind.value}_operations"
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": False}}
