"""Agent backends: what produces an agent's raw output for a rendered prompt.

`AgentBackend` is the protocol (one method, `generate`, returning text). Backends that have more
to report (earlier failed attempts, notes) derive from `DetailedAgentBackend` and implement
`generate_reply`; the builder asks those for the full `AgentReply`. A backend reports failure by
raising: `AgentGenerationError` carries the last raw output and the earlier attempts, so the
builder can record them; any other exception is recorded by its type and message.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

from membuilder.datasets import Session, SessionAnnotation
from membuilder.llm import LLMClient, LLMError
from membuilder.types import CORE_LIMIT, MemBuilderError, MemoryEntry, MemoryKind

from .parsing import parse_agent_output
from .schema import response_format

PURPOSES = ("update", "compress")


@dataclass(frozen=True)
class AgentContext:
    """What a backend may look at besides the prompt (the annotation expert needs it).

    `purpose` is "update" for the agent's normal turn and "compress" for the core compression
    step (the prompt then asks for one REWRITE within `core_limit`).
    """

    owner: str
    session: Session
    session_index: int
    annotation: SessionAnnotation | None
    core: str
    entries: tuple[MemoryEntry, ...]  # the top-k entries of this agent's kind shown in the prompt
    speakers: tuple[str, ...] = ()
    core_limit: int = CORE_LIMIT
    purpose: str = "update"

    def __post_init__(self):
        if self.purpose not in PURPOSES:
            raise ValueError(f"purpose must be one of {PURPOSES}, got {self.purpose!r}")


@runtime_checkable
class AgentBackend(Protocol):
    """Produces the raw text output of one agent for one rendered prompt."""

    name: str

    def generate(self, kind: MemoryKind, messages: list[dict], *, context: AgentContext) -> str: ...


@dataclass(frozen=True)
class AgentReply:
    """A backend's answer: the final raw text, earlier raw outputs that failed, and notes."""

    text: str
    attempts: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


class AgentGenerationError(MemBuilderError):
    """A backend could not produce a usable output (truncated, unparsable after retries, API failure)."""

    def __init__(self, message: str, *, raw_output: str | None = None, attempts: Sequence[str] = (),
                 notes: Sequence[str] = ()):
        super().__init__(message)
        self.raw_output = raw_output
        self.attempts = tuple(attempts)
        self.notes = tuple(notes)


class DetailedAgentBackend(ABC):
    """Base of backends that report attempts and notes along with the text."""

    name: str

    @abstractmethod
    def generate_reply(self, kind: MemoryKind, messages: list[dict], *, context: AgentContext) -> AgentReply:
        """The reply for one rendered prompt; raise `AgentGenerationError` on failure."""

    def generate(self, kind: MemoryKind, messages: list[dict], *, context: AgentContext) -> str:
        return self.generate_reply(kind, messages, context=context).text


def reply_of(backend, key, messages: list[dict], context, *, detailed: bool) -> AgentReply:
    """`backend`'s answer to one prompt as an `AgentReply`, checked for type: `generate_reply` of a
    detailed backend, or `generate`'s text (exceptions propagate). `key` is the agent's memory
    kind or the role; shared by every agent set's backends."""
    if detailed:
        reply = backend.generate_reply(key, messages, context=context)
        if not isinstance(reply, AgentReply):
            raise AgentGenerationError(f"backend {backend.name!r} returned {type(reply).__name__}, not an AgentReply")
        return reply
    text = backend.generate(key, messages, context=context)
    if not isinstance(text, str):
        raise AgentGenerationError(f"backend {getattr(backend, 'name', backend)!r} returned "
                                   f"{type(text).__name__}, not text")
    return AgentReply(text)


def run_backend(backend: AgentBackend, kind: MemoryKind, messages: list[dict], context: AgentContext) -> AgentReply:
    """Call any backend and return an `AgentReply` (exceptions propagate)."""
    return reply_of(backend, kind, messages, context, detailed=isinstance(backend, DetailedAgentBackend))


REPAIR_MESSAGE = ("Your answer could not be used: {error}. Answer again with only the JSON object, "
                  "following the schema given in the instructions.")


class LLMAgentBackend(DetailedAgentBackend):
    """An agent backend on `membuilder.llm.LLMClient` (any OpenAI-compatible server).

    One chat call per agent; only an answer that parses is written to (or served from) the
    response cache. An answer that does not parse is asked for again, at most
    `max_parse_retries` times, with the cache off (`use_cache=False`) and, with `repair_feedback`, with the bad answer and the parser's error appended to
    the conversation (re-sending the same prompt at temperature 0 tends to give the same answer).
    A completion cut at `max_tokens` (`finish_reason == "length"`) is an error, never parsed as
    if it were whole; with `truncation_max_tokens` set above `max_tokens` it is asked once more
    with that larger budget instead (never again with the same one; REFERENCE item 4).
    `constrained=True` sends the agent's JSON schema as `response_format` (for servers with
    grammar-constrained decoding such as `vllm serve`). Transport failures come from the client
    after its own retries and are raised as `AgentGenerationError` with the attempts so far.
    """

    def __init__(self, client: LLMClient, *, model: str | None = None, temperature: float = 0.0,
                 max_tokens: int = 2048, max_parse_retries: int = 2, constrained: bool = False,
                 repair_feedback: bool = True, truncation_max_tokens: int | None = None,
                 top_p: float | None = None, seed: int | None = None,
                 extra_body: Mapping[str, Any] | None = None):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if max_parse_retries < 0:
            raise ValueError(f"max_parse_retries must be >= 0, got {max_parse_retries}")
        if truncation_max_tokens is not None and truncation_max_tokens <= max_tokens:
            raise ValueError(f"truncation_max_tokens ({truncation_max_tokens}) must be larger than "
                             f"max_tokens ({max_tokens}): re-asking with the same budget gets the same cut")
        self.client = client
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_parse_retries = max_parse_retries
        self.constrained = constrained
        self.repair_feedback = repair_feedback
        self.truncation_max_tokens = truncation_max_tokens
        self.top_p = top_p
        self.seed = seed
        self.extra_body = dict(extra_body) if extra_body else None
        self.name = f"llm:{model or client.config.model or '?'}"

    def generate_reply(self, kind: MemoryKind, messages: list[dict], *, context: AgentContext) -> AgentReply:
        compression = context.purpose == "compress"
        fmt = response_format(kind, compression=compression, core_limit=context.core_limit) \
            if self.constrained else None
        conversation = list(messages)
        attempts: list[str] = []
        notes: list[str] = []
        max_tokens = self.max_tokens
        use_cache = True
        parse_failures = 0
        while True:
            try:
                result = self.client.chat(conversation, model=self.model, temperature=self.temperature,
                                          top_p=self.top_p, max_tokens=max_tokens, seed=self.seed,
                                          response_format=fmt, extra_body=self.extra_body, use_cache=use_cache,
                                          cache_if=lambda r: parse_agent_output(kind, r.text).ok)
            except LLMError as exc:
                raise AgentGenerationError(f"{type(exc).__name__}: {exc}",
                                           raw_output=attempts[-1] if attempts else None,
                                           attempts=attempts[:-1], notes=notes) from exc
            text = result.text
            if result.truncated:
                if self.truncation_max_tokens is not None and max_tokens < self.truncation_max_tokens:
                    notes.append(f"output cut at max_tokens={max_tokens}; asked again with "
                                 f"max_tokens={self.truncation_max_tokens}")
                    attempts.append(text)
                    max_tokens = self.truncation_max_tokens
                    use_cache = False
                    continue
                raise AgentGenerationError(
                    f"output cut at max_tokens={max_tokens} (finish_reason 'length'); not parsed",
                    raw_output=text, attempts=attempts, notes=notes)
            parsed = parse_agent_output(kind, text)
            if parsed.ok:
                return AgentReply(text, tuple(attempts), tuple(notes))
            parse_failures += 1
            if parse_failures > self.max_parse_retries:
                raise AgentGenerationError(
                    f"no valid output after {parse_failures} attempt(s): {parsed.error}",
                    raw_output=text, attempts=attempts, notes=notes)
            attempts.append(text)
            notes.append(f"attempt {len(attempts)} unusable: {parsed.error}")
            use_cache = False
            if self.repair_feedback:
                conversation = list(messages) + [
                    {"role": "assistant", "content": text},
                    {"role": "user", "content": REPAIR_MESSAGE.format(error=parsed.error)},
                ]
