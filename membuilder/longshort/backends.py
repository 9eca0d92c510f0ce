"""Backends of the long/short-term agents: the protocol, an LLM backend and two offline experts.

The protocol mirrors `membuilder.agents.backends`: `generate(role, messages, *, context) -> str`,
or `generate_reply` on a `DetailedRoleBackend`; a failure is raised (`AgentGenerationError`
carries the raw output and the earlier attempts). `role` is one of "splitter", "long_term",
"short_term"; `context.purpose` is "update" or "compress" (the short-term consolidation step).

Offline experts (no model; stateless, safe to call concurrently):
- `WorldLongShortExpert` on generated worlds (`membuilder.world`): the session's `SessionPlan` says
  exactly what changes. Important facts are the plan's entry intents (semantic, episodic,
  procedural) and core intents, as their new texts; a restated fact (`restate=True`) is known
  already, so it goes to the unimportant list (which is what the NOOP signal teaches). Long-term:
  a fact whose intent replaces a text shown with it -> UPDATE of that entry; a fact whose exact
  text is shown -> NOOP; otherwise ADD. (A merge of two partial episodes becomes an UPDATE of the
  first one shown; the other stays: one decision per fact.)
- `AnnotationLongShortExpert` on LoCoMo: important = the session's observations and events
  (`SessionAnnotation`; events dated with `event_summary`'s date, in the text, since one store
  kind holds both); unimportant = the sentences of the session summary when annotated. Long-term:
  NOOP when a shown memory has the same normalised text, else ADD; like the MemBuilder annotation
  expert it never emits UPDATE / DELETE (no reliable rule finds a changed fact in LoCoMo).
- Short-term (both): the new state is the old one with one line per unimportant fact appended;
  on "compress" the oldest lines are dropped until the state fits (the expert's own choice,
  recorded by the builder as a consolidation step, not a cut made by code).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Protocol, Sequence, runtime_checkable

from membuilder.agents.backends import AgentGenerationError, AgentReply, reply_of
from membuilder.agents.expert import normalise
from membuilder.datasets import Session, SessionAnnotation
from membuilder.llm import LLMClient, LLMError
from membuilder.types import MemoryEntry

from .schema import ROLES, is_over_limit, parse_role, response_format

PURPOSES = ("update", "compress")
DEFAULT_STATE_LIMIT = 2000
REPAIR_MESSAGE = ("Your answer could not be used: {error}. Answer again with only the JSON object, "
                  "following the schema given in the instructions.")


@dataclass(frozen=True)
class RoleContext:
    """What a backend may look at besides the prompt (the experts need it).

    `facts` / `candidates`: the important facts and, per fact, the entries shown with it (the
    long-term agent's view; empty for the other roles). `state`: the short-term state the prompt
    shows (for "compress": the over-long state to rewrite).
    """

    owner: str
    session: Session
    session_index: int
    annotation: SessionAnnotation | None
    state: str
    state_limit: int = DEFAULT_STATE_LIMIT
    facts: tuple[str, ...] = ()
    candidates: tuple[tuple[MemoryEntry, ...], ...] = ()
    unimportant: tuple[str, ...] = ()
    query: str | None = None
    purpose: str = "update"

    def __post_init__(self):
        if self.purpose not in PURPOSES:
            raise ValueError(f"purpose must be one of {PURPOSES}, got {self.purpose!r}")

    @property
    def candidate_ids(self) -> tuple[tuple[str, ...], ...]:
        return tuple(tuple(e.id for e in shown) for shown in self.candidates)


@runtime_checkable
class RoleBackend(Protocol):
    """Produces the raw text output of one long/short-term agent for one rendered prompt."""

    name: str

    def generate(self, role: str, messages: list[dict], *, context: RoleContext) -> str: ...


class DetailedRoleBackend(ABC):
    """Base of backends that report attempts and notes along with the text."""

    name: str

    @abstractmethod
    def generate_reply(self, role: str, messages: list[dict], *, context: RoleContext) -> AgentReply:
        """The reply for one rendered prompt; raise `AgentGenerationError` on failure."""

    def generate(self, role: str, messages: list[dict], *, context: RoleContext) -> str:
        return self.generate_reply(role, messages, context=context).text


def run_role_backend(backend: RoleBackend, role: str, messages: list[dict], context: RoleContext) -> AgentReply:
    """Call any backend and return an `AgentReply` (exceptions propagate)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
    return reply_of(backend, role, messages, context, detailed=isinstance(backend, DetailedRoleBackend))


def _usable(role: str, text: str, context: RoleContext) -> tuple[bool, str | None]:
    parsed = parse_role(role, text, candidates=context.candidate_ids, state_limit=context.state_limit)
    if parsed.ok or is_over_limit(parsed):  # an over-long state is usable: it goes to consolidation
        return True, None
    return False, parsed.error


class LLMRoleBackend(DetailedRoleBackend):
    """The agents on `membuilder.llm.LLMClient` (any OpenAI-compatible server).

    One chat call per agent turn; an answer that does not parse is asked again at most
    `max_parse_retries` times with the cache off and (with `repair_feedback`) the bad answer and
    the parser's error appended. A completion cut at `max_tokens` is an error, never parsed as if
    it were whole. `constrained=True` sends the role's JSON schema as `response_format`. Only an
    answer that parses is cached. Thread-safe when the client is (it is).
    """

    def __init__(self, client: LLMClient, *, model: str | None = None, temperature: float = 0.0,
                 max_tokens: int = 2048, max_parse_retries: int = 2, constrained: bool = False,
                 repair_feedback: bool = True, extra_body: Mapping[str, Any] | None = None):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if max_parse_retries < 0:
            raise ValueError(f"max_parse_retries must be >= 0, got {max_parse_retries}")
        self.client = client
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_parse_retries = max_parse_retries
        self.constrained = constrained
        self.repair_feedback = repair_feedback
        self.extra_body = dict(extra_body) if extra_body else None
        self.name = f"llm:{model or client.config.model or '?'}"

    def generate_reply(self, role: str, messages: list[dict], *, context: RoleContext) -> AgentReply:
        fmt = response_format(role, state_limit=context.state_limit) if self.constrained else None
        conversation, attempts, notes = list(messages), [], []
        use_cache, failures = True, 0
        while True:
            try:
                result = self.client.chat(conversation, model=self.model, temperature=self.temperature,
                                          max_tokens=self.max_tokens, response_format=fmt,
                                          extra_body=self.extra_body, use_cache=use_cache,
                                          cache_if=lambda r: _usable(role, r.text, context)[0])
            except LLMError as exc:
                raise AgentGenerationError(f"{type(exc).__name__}: {exc}",
                                           raw_output=attempts[-1] if attempts else None,
                                           attempts=attempts[:-1], notes=notes) from exc
            text = result.text
            if result.truncated:
                raise AgentGenerationError(f"output cut at max_tokens={self.max_tokens} (finish_reason "
                                           "'length'); not parsed", raw_output=text, attempts=attempts, notes=notes)
            ok, error = _usable(role, text, context)
            if ok:
                return AgentReply(text, tuple(attempts), tuple(notes))
            failures += 1
            if failures > self.max_parse_retries:
                raise AgentGenerationError(f"no valid output after {failures} attempt(s): {error}",
                                           raw_output=text, attempts=attempts, notes=notes)
            attempts.append(text)
            notes.append(f"attempt {len(attempts)} unusable: {error}")
            use_cache = False
            if self.repair_feedback:
                conversation = list(messages) + [{"role": "assistant", "content": text},
                                                 {"role": "user", "content": REPAIR_MESSAGE.format(error=error)}]


def _dump(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False)


def short_term_expert(context: RoleContext) -> AgentReply:
    """The experts' short-term answer (module doc): append on update, drop oldest on compress."""
    if context.purpose == "compress":
        lines = [x for x in context.state.split("\n") if x.strip()]
        dropped = 0
        while lines and len("\n".join(lines)) > context.state_limit:
            lines.pop(0)
            dropped += 1
        return AgentReply(_dump({"state": "\n".join(lines)}),
                          notes=(f"consolidation dropped the {dropped} oldest line(s)",) if dropped else ())
    lines = [x for x in context.state.split("\n") if x.strip()]
    known = {normalise(x) for x in lines}
    for fact in context.unimportant:
        if normalise(fact) not in known:
            lines.append(fact)
            known.add(normalise(fact))
    return AgentReply(_dump({"state": "\n".join(lines)}))


def _long_term_reply(context: RoleContext, replaces: Mapping[str, tuple[str, ...]]) -> AgentReply:
    """ADD / UPDATE / NOOP per fact from what the expert knows the fact replaces."""
    decisions, taken = [], set()
    for i, (fact, shown) in enumerate(zip(context.facts, context.candidates)):
        by_text = {normalise(e.text): e.id for e in shown}
        if normalise(fact) in by_text:
            decisions.append({"fact": i, "action": "NOOP"})
            continue
        old = [by_text[normalise(t)] for t in replaces.get(fact, ()) if normalise(t) in by_text]
        old = [x for x in old if x not in taken]
        if old:
            taken.add(old[0])
            decisions.append({"fact": i, "action": "UPDATE", "id": old[0], "memory": fact})
        else:
            decisions.append({"fact": i, "action": "ADD", "memory": fact})
    return AgentReply(_dump({"decisions": decisions}))


class WorldLongShortExpert(DetailedRoleBackend):
    """Exact offline expert on generated worlds (module doc)."""

    name = "world-longshort"

    def __init__(self, conversations: Iterable):
        from membuilder.world.model import World, WorldConversation

        if isinstance(conversations, WorldConversation):
            conversations = [conversations]
        elif isinstance(conversations, World):
            conversations = list(conversations)
        self._plans = {}
        for wc in conversations:
            if not isinstance(wc, WorldConversation):
                raise TypeError(f"WorldLongShortExpert takes generated world conversations, got {type(wc).__name__}")
            for plan, session in zip(wc.plans, wc.conversation.sessions):
                self._plans[plan.session_id] = (plan, session.date)

    def _plan(self, context: RoleContext):
        sid = context.session.session_id
        if sid not in self._plans or self._plans[sid][1] != context.session.date:
            raise AgentGenerationError(f"session {sid!r} is not a session of the worlds this expert was given")
        return self._plans[sid][0]

    def facts(self, context: RoleContext) -> tuple[list[str], list[str], dict[str, tuple[str, ...]]]:
        """(important, unimportant, fact -> the texts it replaces) of the context's session."""
        plan = self._plan(context)
        important, unimportant, replaces = [], [], {}
        for intent in plan.core:
            if intent.new not in replaces:
                important.append(intent.new)
                replaces[intent.new] = (intent.old,) if intent.old else ()
        for intent in plan.entries:
            if intent.restate:
                unimportant.append(intent.text)
            elif intent.text not in replaces:
                important.append(intent.text)
                replaces[intent.text] = tuple(intent.replaces)
        return important, unimportant, replaces

    def generate_reply(self, role: str, messages: list[dict], *, context: RoleContext) -> AgentReply:
        important, unimportant, replaces = self.facts(context)
        if role == "splitter":
            return AgentReply(_dump({"important": important, "unimportant": unimportant}))
        if role == "long_term":
            return _long_term_reply(context, replaces)
        return short_term_expert(context)


class AnnotationLongShortExpert(DetailedRoleBackend):
    """Offline expert on LoCoMo's annotations (module doc)."""

    name = "annotation-longshort"

    def facts(self, context: RoleContext) -> tuple[list[str], list[str]]:
        ann = context.annotation
        if ann is None:
            return [], []
        if ann.session_id != context.session.session_id:
            raise AgentGenerationError(f"annotation of {ann.session_id} given for session {context.session.session_id}")
        important, seen = [], set()
        when = ann.date.date().isoformat() if ann.date is not None else None
        for text in [o.text for o in ann.observations] + [
                (f"On {when}: {e.text.strip()}" if when else e.text) for e in ann.events]:
            key = normalise(text)
            if key and key not in seen:
                seen.add(key)
                important.append(text.strip())
        summary = [s.strip() for s in (ann.summary or "").replace("\n", " ").split(". ") if s.strip()]
        return important, summary

    def generate_reply(self, role: str, messages: list[dict], *, context: RoleContext) -> AgentReply:
        if role == "splitter":
            important, unimportant = self.facts(context)
            notes = () if context.annotation else (f"no annotation for {context.session.session_id}: nothing to split",)
            return AgentReply(_dump({"important": important, "unimportant": unimportant}), notes=notes)
        if role == "long_term":
            return _long_term_reply(context, {})
        return short_term_expert(context)


def expert_split(backend: DetailedRoleBackend, context: RoleContext) -> Sequence[str]:
    """The expert's important facts for a context (what `reward` compares the splitter with)."""
    return backend.facts(context)[0]
