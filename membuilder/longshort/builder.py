"""`LongShortBuilder`: one session through splitter -> long-term + short-term agents, applied at once.

Memory layout (one `MemoryBank` per owner, the same store, search and snapshots as MemBuilder):
- long-term facts are `semantic` entries (ids "S<n>"), stamped with the session date as event
  time; they are what the hybrid BM25 + embedding search retrieves (`LONG_TERM_KIND`);
- the short-term state is the bank's core block (bounded by `state_limit` <= the bank's core
  limit); `membuilder.answering.build_answer_context` therefore gives the answer agent exactly
  (state, retrieved long-term memories), and every judge and answerer works unchanged.

Per session:
1. splitter: prompt from the state, the session transcript and the current query (if any);
2. for each important fact its top-k long-term memories are retrieved (`retrieve_candidates`),
   and the long-term agent answers one decision per fact (skipped when there is none);
3. the short-term agent folds the unimportant facts into the state (skipped when there are none);
   a state over `state_limit` is refused and one consolidation call asks for a rewrite under it
   (never cut by code); if that fails too, the short-term agent's error says so and the old state
   stays;
4. the long-term operations (ADD -> `Add`, UPDATE -> `Update`, DELETE -> `Delete` (retire, no
   successor), NOOP -> nothing) and the state's `CoreRewrite` go to one `bank.apply(...,
   skip_invalid=True)`: one transaction. Rejections are recorded with the agent that wrote them.

An agent whose backend raised or whose answer does not parse contributes nothing; its record
says why (`error`), with its raw output and earlier attempts. A splitter error means no facts
this session (both other agents are skipped and say so). Nothing already stored is lost: a bank
failure raises before anything is written. Not safe to run two sessions of one owner at once.
"""

from __future__ import annotations

import time
from enum import Enum
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from tqdm import tqdm

from membuilder.agents.backends import AgentGenerationError
from membuilder.bank import ApplyResult, MemoryBank
from membuilder.datasets import Conversation, Session, SessionAnnotation
from membuilder.operations import Add, CoreRewrite, Delete, Operation, Update, operation_to_dict
from membuilder.types import InvalidInputError, MemoryEntry, MemoryKind, normalise_time

from .backends import DEFAULT_STATE_LIMIT, RoleBackend, RoleContext, run_role_backend
from .prompts import render_consolidation, render_long_term, render_short_term, render_splitter
from .schema import Decision, Parsed, is_over_limit, parse_decisions, parse_split, parse_state

LONG_TERM_KIND = MemoryKind.SEMANTIC
DEFAULT_TOP_K = 5


class Role(str, Enum):
    """The writing agents; a str enum, so `record.agents["splitter"]` works too."""

    SPLITTER = "splitter"
    LONG_TERM = "long_term"
    SHORT_TERM = "short_term"


@dataclass
class RoleRecord:
    """One agent's turn in one session (JSON-serialisable with `to_dict`)."""

    role: str
    messages: list[dict] = field(default_factory=list)
    raw_output: str | None = None
    parsed: Any = None  # Split / tuple[Decision] / state, when the answer parsed
    operations: tuple[dict, ...] = ()  # what was applied
    rejected: tuple[str, ...] = ()  # the bank's reasons for operations it refused
    error: str | None = None
    skipped: str | None = None  # why the agent was not called (no input)
    attempts: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    consolidation: dict | None = None  # short-term: the compression step, when one ran
    elapsed_s: float = 0.0

    @property
    def valid(self) -> bool:
        """The validity gate: the answer parsed and the bank took all of it (a skipped agent is valid)."""
        return self.error is None and not self.rejected

    def to_dict(self) -> dict:
        parsed = self.parsed
        if isinstance(parsed, tuple):
            parsed = [d.to_dict() for d in parsed]
        elif parsed is not None and not isinstance(parsed, str):
            parsed = {"important": list(parsed.important), "unimportant": list(parsed.unimportant)}
        return {"role": self.role, "messages": self.messages, "raw_output": self.raw_output, "parsed": parsed,
                "operations": list(self.operations), "rejected": list(self.rejected), "error": self.error,
                "skipped": self.skipped, "attempts": list(self.attempts), "notes": list(self.notes),
                "consolidation": self.consolidation, "valid": self.valid, "elapsed_s": self.elapsed_s}


@dataclass
class LongShortRecord:
    owner: str
    session_id: str
    session_index: int
    agents: dict[str, RoleRecord]
    result: ApplyResult | None
    state_before: str
    state_after: str
    backend: str
    omitted_turns: tuple[str, ...] = ()

    @property
    def noop_facts(self) -> int:
        """Important facts whose long-term decision was NOOP (the splitter's negative signal)."""
        lt = self.agents["long_term"]
        return sum(d.action == "NOOP" for d in lt.parsed) if lt.error is None and lt.parsed else 0

    def to_dict(self) -> dict:
        r = self.result
        return {"owner": self.owner, "session_id": self.session_id, "session_index": self.session_index,
                "backend": self.backend, "state_before": self.state_before, "state_after": self.state_after,
                "omitted_turns": list(self.omitted_turns), "noop_facts": self.noop_facts,
                "result": None if r is None else {"created": list(r.created), "updated": list(r.updated),
                                                  "retired": list(r.retired), "core_changed": r.core_changed},
                "agents": {k: v.to_dict() for k, v in self.agents.items()}}


def retrieve_candidates(bank: MemoryBank, facts: Sequence[str], top_k: int = DEFAULT_TOP_K
                        ) -> tuple[tuple[MemoryEntry, ...], ...]:
    """Each fact's top-k long-term memories (hybrid search over `LONG_TERM_KIND`); deterministic
    for a given bank state and embedder, so the reward can recompute what a sample was shown."""
    return tuple(tuple(h.entry for h in bank.search(fact[:2000], k=top_k, kinds=LONG_TERM_KIND))
                 for fact in facts)


def decisions_to_operations(decisions: Sequence[Decision], when: str | None) -> list[Operation]:
    """ADD -> Add, UPDATE -> Update, DELETE -> Delete (retire), NOOP -> nothing; in fact order."""
    ops: list[Operation] = []
    for d in decisions:
        if d.action == "ADD":
            ops.append(Add(LONG_TERM_KIND, d.memory, when))
        elif d.action == "UPDATE":
            ops.append(Update(LONG_TERM_KIND, d.id, d.memory, when))
        elif d.action == "DELETE":
            ops.append(Delete(LONG_TERM_KIND, d.id))
    return ops


def apply_longshort(bank: MemoryBank, decisions: Sequence[Decision] | None, state: str | None, *,
                    session_id: str | None, when: str | None) -> tuple[ApplyResult, list[str], list[str]]:
    """Apply the long-term decisions and the new state in one transaction (`skip_invalid`).

    Returns (result, long-term rejections, short-term rejections). `state` None or equal to the
    current core: no state change."""
    lt_ops = decisions_to_operations(decisions or (), when)
    ops = list(lt_ops)
    if state is not None and state != bank.core:
        ops.append(CoreRewrite(state))
    result = bank.apply(ops, session_id=session_id, skip_invalid=True)
    lt_rej = [f"{r.operation.action if hasattr(r.operation, 'action') else r.operation}: {r.reason}"
              for r in result.rejected if r.index < len(lt_ops)]
    st_rej = [r.reason for r in result.rejected if r.index >= len(lt_ops)]
    return result, lt_rej, st_rej


def session_time(session: Session) -> str | None:
    return normalise_time(session.date.date()) if session.date is not None else None


class LongShortBuilder:
    """Builds long/short-term memory session by session (module doc)."""

    def __init__(self, backend: RoleBackend, *, top_k: int = DEFAULT_TOP_K, state_limit: int = DEFAULT_STATE_LIMIT,
                 max_transcript_chars: int = 24000):
        if not hasattr(backend, "name") or not (hasattr(backend, "generate") or hasattr(backend, "generate_reply")):
            raise InvalidInputError(f"backend must have a name and a generate() method, got {type(backend).__name__}")
        if top_k < 1 or state_limit < 1:
            raise InvalidInputError(f"top_k and state_limit must be >= 1, got {top_k}, {state_limit}")
        self.backend = backend
        self.top_k = top_k
        self.state_limit = state_limit
        self.max_transcript_chars = max_transcript_chars

    def _call(self, record: RoleRecord, role: str, messages: list[dict], context: RoleContext) -> str | None:
        started = time.perf_counter()
        record.messages = messages
        try:
            reply = run_role_backend(self.backend, role, messages, context)
            record.raw_output, record.attempts, record.notes = reply.text, reply.attempts, reply.notes
            return reply.text
        except AgentGenerationError as exc:
            record.error, record.raw_output, record.attempts, record.notes = (
                str(exc), exc.raw_output, exc.attempts, exc.notes)
        except Exception as exc:  # any backend failure is this agent's error, in its record
            record.error = f"{type(exc).__name__}: {exc}"
        finally:
            record.elapsed_s += time.perf_counter() - started
        return None

    def _parsed(self, record: RoleRecord, parsed: Parsed) -> Any:
        if parsed.ok:
            record.parsed = parsed.value
            return parsed.value
        record.error = f"unparsable answer: {parsed.error}"
        return None

    def add_session(self, bank: MemoryBank, session: Session, *, session_index: int = 0,
                    annotation: SessionAnnotation | None = None, query: str | None = None) -> LongShortRecord:
        """Run the three writing agents on `session` and apply their result in one transaction."""
        if not isinstance(session, Session):
            raise InvalidInputError(f"session must be a membuilder.datasets.Session, got {type(session).__name__}")
        if self.state_limit > bank.core_limit:
            raise InvalidInputError(f"state_limit {self.state_limit} is over the bank's core limit {bank.core_limit}")
        state = bank.core
        base = RoleContext(owner=bank.owner, session=session, session_index=session_index, annotation=annotation,
                           state=state, state_limit=self.state_limit, query=query)
        recs = {r: RoleRecord(r.value) for r in Role}

        prompt = render_splitter(session, state, query, max_transcript_chars=self.max_transcript_chars)
        raw = self._call(recs["splitter"], "splitter", prompt.messages, base)
        split = self._parsed(recs["splitter"], parse_split(raw)) if raw is not None else None

        decisions = None
        facts = split.important if split else ()
        if split is None:
            recs["long_term"].skipped = recs["short_term"].skipped = "the splitter gave no usable answer"
        elif not facts:
            recs["long_term"].skipped = "no important facts"
        else:
            candidates = retrieve_candidates(bank, facts, self.top_k)
            ctx = RoleContext(**{**base.__dict__, "facts": facts, "candidates": candidates})
            messages = render_long_term(facts, candidates, session).messages
            raw = self._call(recs["long_term"], "long_term", messages, ctx)
            if raw is not None:
                decisions = self._parsed(recs["long_term"], parse_decisions(raw, ctx.candidate_ids))

        new_state = None
        if split is not None and not split.unimportant:
            recs["short_term"].skipped = "no unimportant facts"
        elif split is not None:
            new_state = self._short_term(recs["short_term"], base, split.unimportant, session)

        result, lt_rej, st_rej = apply_longshort(bank, decisions, new_state, session_id=session.session_id,
                                                 when=session_time(session))
        if decisions is not None:
            recs["long_term"].operations = tuple(operation_to_dict(op) for op in
                                                 decisions_to_operations(decisions, session_time(session)))
        recs["long_term"].rejected = tuple(lt_rej)
        if new_state is not None and new_state != state and not st_rej:
            recs["short_term"].operations = ({"action": "REWRITE", "content": new_state},)
        recs["short_term"].rejected = tuple(st_rej)
        return LongShortRecord(bank.owner, session.session_id, session_index, recs, result, state, bank.core,
                               self.backend.name, prompt.omitted_turns)

    def _short_term(self, record: RoleRecord, base: RoleContext, facts: Sequence[str], session: Session) -> str | None:
        ctx = RoleContext(**{**base.__dict__, "unimportant": tuple(facts)})
        raw = self._call(record, "short_term", render_short_term(base.state, facts, session,
                                                                 state_limit=self.state_limit).messages, ctx)
        if raw is None:
            return None
        parsed = parse_state(raw, self.state_limit)
        if parsed.ok:
            record.parsed = parsed.value
            return parsed.value
        if not is_over_limit(parsed):
            record.error = f"unparsable answer: {parsed.error}"
            return None
        # over the bound: one consolidation call, never a cut made here
        long_state = parsed.value
        step = {"proposed_chars": len(long_state), "messages": None, "raw_output": None, "error": None}
        prompt = render_consolidation(long_state, state_limit=self.state_limit)
        step["messages"] = prompt.messages
        sub = RoleRecord("short_term")
        raw2 = self._call(sub, "short_term", prompt.messages,
                          RoleContext(**{**ctx.__dict__, "state": long_state, "purpose": "compress"}))
        step["raw_output"] = sub.raw_output
        record.elapsed_s += sub.elapsed_s
        record.consolidation = step
        if raw2 is None:
            step["error"] = sub.error
        else:
            again = parse_state(raw2, self.state_limit)
            if again.ok:
                record.parsed = again.value
                return again.value
            step["error"] = again.error
        record.error = f"state over the limit ({len(long_state)} > {self.state_limit}) and consolidation " \
                       f"failed: {step['error']}"
        return None

    def build(self, bank: MemoryBank, conversation: Conversation, *, max_sessions: int | None = None,
              progress: bool = False, on_record: Callable[[LongShortRecord], None] | None = None,
              on_agent: Callable[[int, Role, str | None], None] | None = None) -> list[LongShortRecord]:
        """Add the conversation's sessions in order (annotations to their sessions); `on_record`
        after each session (e.g. append to a JSONL file, so a crash loses nothing done);
        `on_agent(session index, role, error)` after each session for each of the three agents."""
        if max_sessions is not None and max_sessions < 0:
            raise InvalidInputError(f"max_sessions must be >= 0, got {max_sessions}")
        annotations = {a.session_id: a for a in conversation.annotations}
        sessions = conversation.sessions if max_sessions is None else conversation.sessions[:max_sessions]
        records = []
        for index, session in enumerate(tqdm(sessions, desc=f"longshort {conversation.conversation_id}",
                                             disable=not progress)):
            record = self.add_session(bank, session, session_index=index,
                                      annotation=annotations.get(session.session_id))
            records.append(record)
            if on_agent is not None:
                for role, rec in record.agents.items():
                    on_agent(index, role, rec.error)
            if on_record is not None:
                on_record(record)
        return records
