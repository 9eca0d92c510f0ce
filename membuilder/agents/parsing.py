"""The agents' output parser: raw model text -> typed operations, or a typed error.

This is the validity gate of the reward too (DESIGN section 6), so it is strict about the answer
and lenient only about the wrapping, in a fixed and bounded way:

1. think-blocks are removed by `membuilder.thinking.strip_think_blocks` (the one implementation,
   shared with the judge and answering; linear time): every `<think>...</think>`; an orphan
   `</think>` drops everything before it (chat templates that open the block in the prompt); an
   unterminated `<think>` drops everything after it (the model was cut off while thinking);
2. code fences (```` ```json ... ``` ````) and prose around the answer are skipped by the object
   search below, not edited out: a string may hold a raw newline (see 4), so removing fence lines
   textually could change an answer;
3. the first balanced JSON object is taken: candidates start at a `{` followed by `"` or `}` (so a
   stray brace in prose is not mistaken for JSON); the end is found by string-aware brace matching.
   A candidate that reaches the end of the text unclosed is reported as cut off, and nothing
   inside it is used (an inner object of a truncated answer is never parsed as the answer). A
   balanced candidate that is not valid JSON is skipped as a whole and the search goes on after it;
4. the object is read as JSON with raw control characters allowed inside strings (a literal newline
   in a multi-line memory is common in model output, and grammar-constrained decoding with
   xgrammar produces it), duplicate keys refused, then validated by
   `membuilder.operations.parse_operations`. A number the JSON reader refuses (an integer of more
   than 4,300 digits) makes the object malformed like any other syntax error.

Whatever the input, the parser returns a `ParsedOutput`; it never raises on model text. Error
messages quote model text only through `membuilder.types.excerpt` (bounded).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from membuilder.operations import Operation, parse_operations
from membuilder.thinking import strip_think_blocks
from membuilder.types import InvalidInputError, MemoryKind, excerpt

_OBJECT_START = re.compile(r'\{\s*["}]')


@dataclass(frozen=True)
class ParsedOutput:
    """The result of parsing one agent output. `ok` iff `error` is None."""

    kind: MemoryKind
    ok: bool
    operations: tuple[Operation, ...] = ()
    error: str | None = None
    json_text: str | None = None  # the JSON object that was taken, when one was found


def strip_think(text: str) -> tuple[str, str | None]:
    """Remove think-blocks (see the module doc). Returns (text, note about an unusual block).

    Kept for callers of the tuple form; `membuilder.thinking.strip_think_blocks` says more.
    """
    stripped = strip_think_blocks(text)
    return stripped.text, stripped.note


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"key {excerpt(key)} appears twice in one object")
        out[key] = value
    return out


def _balanced_end(text: str, start: int) -> int | None:
    """Index just past the `}` closing the object that opens at `start`; None if it never closes."""
    depth = 0
    in_string = escaped = False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def find_json_object(text: str) -> tuple[dict | None, str | None, str | None]:
    """The first balanced JSON object of `text`: (object, its text, None) or (None, None, error)."""
    pos = 0
    first_error = None
    while (m := _OBJECT_START.search(text, pos)) is not None:
        start = m.start()
        end = _balanced_end(text, start)
        if end is None:
            return None, None, (f"the output ends inside the JSON object that starts at character {start} "
                                "(cut off before the object was closed?)")
        candidate = text[start:end]
        try:
            return json.loads(candidate, object_pairs_hook=_no_duplicates, strict=False), candidate, None
        except json.JSONDecodeError as exc:
            first_error = first_error or (f"the JSON object at character {start} is malformed: {exc.msg} "
                                          f"(at its character {exc.pos})")
        except (ValueError, RecursionError) as exc:
            # _DuplicateKey, and what the reader raises outside its syntax errors: an integer over
            # Python's 4,300-digit conversion limit is a ValueError, not a JSONDecodeError
            first_error = first_error or (f"the JSON object at character {start} is malformed: "
                                          f"{excerpt(str(exc), 120)}")
        pos = end
    return None, None, first_error or "no JSON object found in the output"


def parse_agent_output(kind: MemoryKind | str, raw: str | None) -> ParsedOutput:
    """Parse one agent's raw output into typed operations (see the module doc for the rules)."""
    kind = MemoryKind.parse(kind)  # a wrong kind is the caller's bug: it raises
    if raw is None:
        return ParsedOutput(kind, False, error="no output")
    if not isinstance(raw, str):
        return ParsedOutput(kind, False, error=f"output is a {type(raw).__name__}, not text")
    text, note = strip_think(raw)
    if not text.strip():
        what = "empty output" if not raw.strip() else "nothing but a think-block in the output"
        return ParsedOutput(kind, False, error=f"{what}" + (f"; {note}" if note else ""))
    data, json_text, error = find_json_object(text)
    if error is not None:
        return ParsedOutput(kind, False, error=error + (f"; {note}" if note else ""))
    try:
        operations = parse_operations(kind, data)
    except InvalidInputError as exc:
        return ParsedOutput(kind, False, error=f"invalid {kind.value} answer: {exc}", json_text=json_text)
    return ParsedOutput(kind, True, tuple(operations), None, json_text)
