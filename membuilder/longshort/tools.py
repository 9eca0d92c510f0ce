"""Memory tools with OpenAI-style JSON schemas, executed against a `MemoryBank`, with metrics.

    memory_insert  {content, time?}          -> Add a long-term (semantic) memory
    memory_update  {id, content, time?}      -> Update one
    memory_delete  {id}                      -> retire one (no successor)
    memory_search  {query, k?}               -> hybrid BM25 + embedding search of long-term memory

`TOOLS` is the list to send as `tools=` to a chat model; `MemoryTools.execute(call)` takes one
tool call (`{"name", "arguments"}` with arguments a JSON string or an object, as the OpenAI API
returns them) and returns a `ToolResult`: `ok`, the JSON-able `output` for the model, or an
`error` naming what was wrong (unknown tool, bad JSON, a missing / unknown / mistyped argument,
an id the bank does not hold). A failed call changes nothing. Arguments are checked by hand
against the same rules the schemas state (no runtime dependency on a validator).

Metrics per tool (`MemoryTools.metrics`): calls, errors, entries written (created or updated),
entries retired, characters written, and, when the caller says how much source text the writes
came from (`note_source(chars)`), the compression ratio = characters written / source characters.
Safe to call from several threads (one lock around execution and metrics).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, Mapping

from membuilder.bank import MemoryBank
from membuilder.operations import Add, Delete, Update
from membuilder.types import MemBuilderError, check_text, excerpt

from .builder import LONG_TERM_KIND

MAX_SEARCH_K = 50


def _fn(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": required,
                       "additionalProperties": False}}}


_TIME = {"type": "string", "description": "ISO-8601 date of the event, e.g. 2023-05-08"}
TOOLS: list[dict] = [
    _fn("memory_insert", "Store a new long-term memory (one self-contained fact).",
        {"content": {"type": "string", "minLength": 1}, "time": _TIME}, ["content"]),
    _fn("memory_update", "Replace the text of a stored memory by id (the fact changed).",
        {"id": {"type": "string", "minLength": 1}, "content": {"type": "string", "minLength": 1}, "time": _TIME},
        ["id", "content"]),
    _fn("memory_delete", "Retire a stored memory by id (it is no longer true).",
        {"id": {"type": "string", "minLength": 1}}, ["id"]),
    _fn("memory_search", "Search long-term memory; returns the best matches with ids.",
        {"query": {"type": "string", "minLength": 1},
         "k": {"type": "integer", "minimum": 1, "maximum": MAX_SEARCH_K}}, ["query"]),
]
TOOL_NAMES = tuple(t["function"]["name"] for t in TOOLS)
_SPEC = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


class ToolCallError(MemBuilderError, ValueError):
    """A tool call is malformed; the message names the tool and the argument."""


@dataclass(frozen=True)
class ToolResult:
    name: str
    ok: bool
    output: Any = None
    error: str | None = None


@dataclass
class ToolMetrics:
    calls: int = 0
    errors: int = 0
    entries_written: int = 0
    entries_retired: int = 0
    chars_written: int = 0
    results_returned: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def check_arguments(name: str, args: Any) -> dict:
    """The call's arguments, checked against the tool's schema (ToolCallError otherwise)."""
    if name not in _SPEC:
        raise ToolCallError(f"unknown tool {excerpt(name)}; expected one of {list(TOOL_NAMES)}")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as exc:
            raise ToolCallError(f"{name}: arguments are not valid JSON ({exc.msg})") from None
    if not isinstance(args, dict):
        raise ToolCallError(f"{name}: arguments must be an object, got {type(args).__name__}")
    spec = _SPEC[name]
    missing = [k for k in spec["required"] if k not in args]
    if missing:
        raise ToolCallError(f"{name}: missing argument(s) {missing}")
    unknown = sorted(set(args) - set(spec["properties"]))
    if unknown:
        raise ToolCallError(f"{name}: unknown argument(s) {excerpt(unknown)}")
    for key, value in args.items():
        prop = spec["properties"][key]
        if prop["type"] == "string":
            try:
                check_text(value, f"{name}.{key}")
            except ValueError as exc:
                raise ToolCallError(str(exc)) from None
            if prop.get("minLength") and not value.strip():
                raise ToolCallError(f"{name}.{key} must be a non-empty string")
        elif prop["type"] == "integer":
            if not isinstance(value, int) or isinstance(value, bool) or not prop["minimum"] <= value <= prop["maximum"]:
                raise ToolCallError(f"{name}.{key} must be an integer in [{prop['minimum']}, {prop['maximum']}], "
                                    f"got {excerpt(value)}")
    return args


class MemoryTools:
    """Executes tool calls against one bank (module doc)."""

    def __init__(self, bank: MemoryBank, *, session_id: str | None = None):
        self.bank = bank
        self.session_id = session_id
        self.metrics: dict[str, ToolMetrics] = {n: ToolMetrics() for n in TOOL_NAMES}
        self.source_chars = 0
        self._lock = threading.Lock()

    def note_source(self, chars: int) -> None:
        """Count `chars` characters of source text (what the writes summarise)."""
        if not isinstance(chars, int) or chars < 0:
            raise ValueError(f"chars must be an integer >= 0, got {chars!r}")
        with self._lock:
            self.source_chars += chars

    @property
    def compression_ratio(self) -> float | None:
        """Characters written by insert + update over source characters; None without a source."""
        if self.source_chars == 0:
            return None
        written = self.metrics["memory_insert"].chars_written + self.metrics["memory_update"].chars_written
        return written / self.source_chars

    def summary(self) -> dict:
        return {"tools": {n: m.to_dict() for n, m in self.metrics.items()},
                "source_chars": self.source_chars, "compression_ratio": self.compression_ratio}

    def execute(self, call: Mapping[str, Any]) -> ToolResult:
        """Run one tool call; an error is returned (and counted), never raised, for bad calls."""
        name = call.get("name") if isinstance(call, Mapping) else None
        if isinstance(call, Mapping) and "function" in call and name is None:  # {"type": "function", "function": {...}}
            call = call["function"]
            name = call.get("name") if isinstance(call, Mapping) else None
        with self._lock:
            metrics = self.metrics.get(name) if isinstance(name, str) else None
            if metrics is not None:
                metrics.calls += 1
            try:
                args = check_arguments(name, call.get("arguments", {}) if isinstance(call, Mapping) else None)
                output = self._run(name, args, metrics)
            except MemBuilderError as exc:  # bad arguments, unknown / retired id, rejected operation
                if metrics is not None:
                    metrics.errors += 1
                return ToolResult(str(name), False, error=str(exc))
            return ToolResult(name, True, output)

    def _run(self, name: str, args: dict, m: ToolMetrics) -> Any:
        if name == "memory_search":
            hits = self.bank.search(args["query"], k=args.get("k", 5), kinds=LONG_TERM_KIND)
            m.results_returned += len(hits)
            return [{"id": h.entry.id, "text": h.entry.text, "time": h.entry.event_time, "score": round(h.score, 6)}
                    for h in hits]
        if name == "memory_insert":
            op = Add(LONG_TERM_KIND, args["content"].strip(), args.get("time"))
        elif name == "memory_update":
            op = Update(LONG_TERM_KIND, args["id"], args["content"].strip(), args.get("time"))
        else:
            op = Delete(LONG_TERM_KIND, args["id"])
        result = self.bank.apply([op], session_id=self.session_id)  # raises OperationRejected: nothing written
        if name == "memory_delete":
            m.entries_retired += len(result.retired)
            return {"retired": list(result.retired)}
        m.entries_written += len(result.touched)
        m.chars_written += len(op.memory if name == "memory_insert" else op.new_memory)
        return {"id": (result.created or result.updated)[0]}
