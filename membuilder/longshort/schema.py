"""Output schemas and strict parsers of the long/short-term agents (DESIGN section 9).

Three agents write memory, each answering one JSON object:

    splitter    {"important": [fact, ...], "unimportant": [fact, ...]}
    long_term   {"decisions": [{"fact": i, "action": "ADD", "memory": text}
                               {"fact": i, "action": "UPDATE", "id": shown id, "memory": text}
                               {"fact": i, "action": "DELETE", "id": shown id}
                               {"fact": i, "action": "NOOP"}, ...]}
    short_term  {"state": text}

Every object may carry a free-text "reason" (ignored); any other key is an error. The wrapping is
handled exactly as for the MemBuilder agents (`membuilder.agents.parsing`): think-blocks removed
by `membuilder.thinking.strip_think_blocks`, the first balanced JSON object taken by
`find_json_object` (code fences and prose around it skipped; a cut-off object is an error). The
"bounded repair" is the backend's: at most `max_parse_retries` re-asks with the parser's error
(`membuilder.longshort.backends.LLMRoleBackend`); the parser itself never edits an answer.

The long-term parser is strict against what the agent was shown: exactly one decision per
important fact (indices 0..m-1), an UPDATE / DELETE may name only an id retrieved for *that*
fact, and no id may be the target of two decisions in one answer (the second would act on an
entry the first already changed). This parser is the validity gate of the reward too, so it
refuses rather than guesses. Whatever the input, a parser returns a result; it never raises on
model text, and error messages quote model text only through `membuilder.types.excerpt`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from membuilder.agents.parsing import find_json_object
from membuilder.thinking import strip_think_blocks
from membuilder.types import InvalidInputError, check_text, excerpt

ROLES = ("splitter", "long_term", "short_term")
LT_ACTIONS = ("ADD", "UPDATE", "DELETE", "NOOP")
MAX_FACTS = 64  # per list; a longer answer is refused (a policy listing every word is not splitting)
MAX_FACT_CHARS = 1000


@dataclass(frozen=True)
class Split:
    important: tuple[str, ...]
    unimportant: tuple[str, ...]


@dataclass(frozen=True)
class Decision:
    """One long-term decision: `memory` for ADD / UPDATE, `id` for UPDATE / DELETE."""

    fact: int
    action: str
    memory: str | None = None
    id: str | None = None

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"fact": self.fact, "action": self.action}
        if self.id is not None:
            out["id"] = self.id
        if self.memory is not None:
            out["memory"] = self.memory
        return out


@dataclass(frozen=True)
class Parsed:
    """The result of parsing one agent output. `ok` iff `error` is None; `value` is a `Split`,
    a tuple of `Decision`s or the state string."""

    role: str
    ok: bool
    value: Any = None
    error: str | None = None


# --- JSON schemas (for response_format and for the documentation of the prompts) ---------------

SPLITTER_SCHEMA = {
    "type": "object",
    "properties": {
        "important": {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_FACTS},
        "unimportant": {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_FACTS},
        "reason": {"type": "string"},
    },
    "required": ["important", "unimportant"],
    "additionalProperties": False,
}

LONG_TERM_SCHEMA = {
    "type": "object",
    "properties": {
        "decisions": {"type": "array", "items": {
            "type": "object",
            "properties": {
                "fact": {"type": "integer", "minimum": 0},
                "action": {"enum": list(LT_ACTIONS)},
                "id": {"type": "string", "minLength": 1},
                "memory": {"type": "string", "minLength": 1},
                "reason": {"type": "string"},
            },
            "required": ["fact", "action"],
            "additionalProperties": False,
        }},
        "reason": {"type": "string"},
    },
    "required": ["decisions"],
    "additionalProperties": False,
}


def short_term_schema(state_limit: int) -> dict:
    return {"type": "object",
            "properties": {"state": {"type": "string", "maxLength": state_limit}, "reason": {"type": "string"}},
            "required": ["state"], "additionalProperties": False}


def role_schema(role: str, *, state_limit: int) -> dict:
    if role == "splitter":
        return SPLITTER_SCHEMA
    if role == "long_term":
        return LONG_TERM_SCHEMA
    if role == "short_term":
        return short_term_schema(state_limit)
    raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")


def response_format(role: str, *, state_limit: int) -> dict:
    """The OpenAI `response_format` for grammar-constrained decoding of `role`'s answer.

    `strict` is False, as for the MemBuilder agents: OpenAI's strict mode needs every property
    required (our `reason`, `id`, `memory` are optional); vLLM enforces the schema anyway. The
    schema cannot say "an id shown with this fact" or "one decision per fact": the parser checks."""
    return {"type": "json_schema",
            "json_schema": {"name": f"longshort_{role}", "strict": False,
                            "schema": role_schema(role, state_limit=state_limit)}}


# --- parsing ------------------------------------------------------------------------------------


def _object(role: str, raw: Any) -> tuple[dict | None, Parsed | None]:
    if raw is None:
        return None, Parsed(role, False, error="no output")
    if not isinstance(raw, str):
        return None, Parsed(role, False, error=f"output is a {type(raw).__name__}, not text")
    stripped = strip_think_blocks(raw)
    note = f"; {stripped.note}" if stripped.note else ""
    if not stripped.text.strip():
        what = "empty output" if not raw.strip() else "nothing but a think-block in the output"
        return None, Parsed(role, False, error=what + note)
    data, _, error = find_json_object(stripped.text)
    if error is not None:
        return None, Parsed(role, False, error=error + note)
    return data, None


def _keys(data: dict, required: Sequence[str], optional: Sequence[str], where: str) -> None:
    missing = [k for k in required if k not in data]
    if missing:
        raise InvalidInputError(f"{where} is missing {missing}")
    unknown = sorted(set(data) - set(required) - set(optional) - {"reason"})
    if unknown:
        raise InvalidInputError(f"{where} has unknown field(s) {excerpt(unknown)}")
    if "reason" in data and data["reason"] is not None and not isinstance(data["reason"], str):
        raise InvalidInputError(f"{where}.reason must be a string")


def _text(value: Any, where: str, limit: int | None = None) -> str:
    check_text(value, where)
    if not value.strip():
        raise InvalidInputError(f"{where} must be a non-empty string")
    if limit is not None and len(value) > limit:
        raise InvalidInputError(f"{where} has {len(value)} characters, over the limit of {limit}")
    return value.strip()


def _facts(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise InvalidInputError(f"'{where}' must be a list of strings, got {type(value).__name__}")
    if len(value) > MAX_FACTS:
        raise InvalidInputError(f"'{where}' has {len(value)} facts, over the limit of {MAX_FACTS}")
    return tuple(_text(v, f"{where}[{i}]", MAX_FACT_CHARS) for i, v in enumerate(value))


def parse_split(raw: Any) -> Parsed:
    """The splitter's answer -> `Split` (module doc)."""
    data, failed = _object("splitter", raw)
    if failed:
        return failed
    try:
        _keys(data, ("important", "unimportant"), (), "splitter answer")
        return Parsed("splitter", True, Split(_facts(data["important"], "important"),
                                              _facts(data["unimportant"], "unimportant")))
    except InvalidInputError as exc:
        return Parsed("splitter", False, error=f"invalid splitter answer: {exc}")


def parse_decisions(raw: Any, candidates: Sequence[Sequence[str]]) -> Parsed:
    """The long-term agent's answer -> tuple of `Decision`s ordered by fact index.

    `candidates[i]` are the ids shown with important fact i (its top-k retrieved memories).
    """
    data, failed = _object("long_term", raw)
    if failed:
        return failed
    try:
        _keys(data, ("decisions",), (), "long-term answer")
        items = data["decisions"]
        if not isinstance(items, list):
            raise InvalidInputError(f"'decisions' must be a list, got {type(items).__name__}")
        by_fact: dict[int, Decision] = {}
        targets: dict[str, int] = {}
        for n, item in enumerate(items):
            where = f"decisions[{n}]"
            if not isinstance(item, dict):
                raise InvalidInputError(f"{where} must be an object, got {type(item).__name__}")
            action = item.get("action")
            if not isinstance(action, str) or action.strip().upper() not in LT_ACTIONS:
                raise InvalidInputError(f"{where}.action must be one of {list(LT_ACTIONS)}, got {excerpt(action)}")
            action = action.strip().upper()
            required = {"ADD": ("fact", "memory"), "UPDATE": ("fact", "id", "memory"),
                        "DELETE": ("fact", "id"), "NOOP": ("fact",)}[action]
            _keys(item, ("action", *required), (), where)
            fact = item["fact"]
            if not isinstance(fact, int) or isinstance(fact, bool) or not 0 <= fact < len(candidates):
                raise InvalidInputError(f"{where}.fact must be an integer in [0, {len(candidates)}), "
                                        f"got {excerpt(fact)}")
            if fact in by_fact:
                raise InvalidInputError(f"{where}: fact {fact} has a second decision")
            entry_id = None
            if "id" in required:
                entry_id = _text(item["id"], f"{where}.id", 64)
                if entry_id not in candidates[fact]:
                    raise InvalidInputError(f"{where}.id {excerpt(entry_id)} was not shown with fact {fact} "
                                            f"(shown: {excerpt(list(candidates[fact]))})")
                if entry_id in targets:
                    raise InvalidInputError(f"{where}.id {excerpt(entry_id)} is already the target of "
                                            f"the decision on fact {targets[entry_id]}")
                targets[entry_id] = fact
            memory = _text(item["memory"], f"{where}.memory", MAX_FACT_CHARS) if "memory" in required else None
            by_fact[fact] = Decision(fact, action, memory, entry_id)
        missing = [i for i in range(len(candidates)) if i not in by_fact]
        if missing:
            raise InvalidInputError(f"no decision for fact(s) {missing[:10]}"
                                    + (" ..." if len(missing) > 10 else ""))
        return Parsed("long_term", True, tuple(by_fact[i] for i in range(len(candidates))))
    except InvalidInputError as exc:
        return Parsed("long_term", False, error=f"invalid long-term answer: {exc}")


def parse_state(raw: Any, state_limit: int) -> Parsed:
    """The short-term agent's answer -> the new state (stripped). Over `state_limit` characters
    it is refused (never cut): the builder then runs the compression step."""
    data, failed = _object("short_term", raw)
    if failed:
        return failed
    try:
        _keys(data, ("state",), (), "short-term answer")
        state = data["state"]
        check_text(state, "'state'")
        state = state.strip()
        if len(state) > state_limit:
            return Parsed("short_term", False, value=state,
                          error=f"state has {len(state)} characters, over the limit of {state_limit}")
        return Parsed("short_term", True, state)
    except InvalidInputError as exc:
        return Parsed("short_term", False, error=f"invalid short-term answer: {exc}")


def parse_role(role: str, raw: Any, *, candidates: Sequence[Sequence[str]] = (), state_limit: int) -> Parsed:
    """Dispatch on `role` (a wrong role is the caller's bug: ValueError)."""
    if role == "splitter":
        return parse_split(raw)
    if role == "long_term":
        return parse_decisions(raw, candidates)
    if role == "short_term":
        return parse_state(raw, state_limit)
    raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")


def is_over_limit(parsed: Parsed) -> bool:
    """True when a short-term answer failed only because its state is too long."""
    return parsed.role == "short_term" and not parsed.ok and isinstance(parsed.value, str)
