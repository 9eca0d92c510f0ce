"""`MemoryBuilder`: one session in, the four agents run, their operations applied in one transaction.

For each session (DESIGN section 2, REFERENCE item 3):
1. the four prompts are rendered from the bank's state before the session (and that state is
   snapshotted for the record);
2. the four agents run concurrently on a thread pool; each answer is parsed by
   `parse_agent_output`. An agent whose backend raised (after its own retries), that timed out,
   or whose answer does not parse, contributes nothing this session, and its `AgentRecord.error`
   says why; it is never silently dropped and never partly applied;
3. a core change that would pass the core limit triggers the compression step (one bounded call
   asking the same backend to REWRITE the block under the limit); the step is recorded;
4. all parsed operations go to `bank.apply(..., skip_invalid=True)` once: one transaction. The
   operations the bank rejects (an id that does not exist, the wrong kind, a REPLACE whose
   old_text is absent...) are dropped and their reasons recorded with the agent that wrote them.

Nothing is applied twice: a retried or re-asked agent contributes only its final answer, and a
late answer after `agent_timeout_s` is discarded. `add_session` is not idempotent: calling it twice
for one session applies that session's operations twice. The bank must not change under the
builder while a session is being added. A failure of the bank itself (store, embedder) raises,
leaving the bank as it was.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from tqdm import tqdm

from membuilder.bank import ApplyResult, MemoryBank
from membuilder.datasets import Conversation, Session, SessionAnnotation
from membuilder.operations import CoreAppend, CoreReplace, CoreRewrite, Operation, operation_to_dict
from membuilder.snapshots import state_digest
from membuilder.types import BankState, InvalidInputError, MemoryKind

from .backends import AgentBackend, AgentContext, AgentGenerationError, AgentReply, run_backend
from .parsing import parse_agent_output
from .prompts import (
    AGENT_KINDS,
    DEFAULT_MAX_ENTRY_CHARS,
    DEFAULT_MAX_PROMPT_CHARS,
    DEFAULT_MAX_TURN_CHARS,
    DEFAULT_TOP_K,
    RenderedPrompt,
    render_compression_prompt,
    render_session_prompts,
    speakers_of,
)


@dataclass(frozen=True)
class CompressionRecord:
    """The core compression step: its prompt, raw answer, the REWRITE it gave, or why it failed."""

    messages: list[dict]
    raw_output: str | None
    operation: CoreRewrite | None
    error: str | None
    proposed_chars: int = 0  # length the agent's change would have given the block

    def to_dict(self) -> dict:
        return {"messages": self.messages, "raw_output": self.raw_output,
                "operation": operation_to_dict(self.operation) if self.operation else None,
                "error": self.error, "proposed_chars": self.proposed_chars}


@dataclass(frozen=True)
class AgentRecord:
    """One agent's work for one session: the expert-trajectory format.

    `operations` are those applied (parsed, minus the ones the bank rejected; for a compressed core
    change, the compression's REWRITE); `parsed` all that the answer held; `rejected` the bank's
    reasons; `error` why the agent's work was lost (backend failure, timeout, unparsable answer,
    failed compression), None when it was not. `attempts` are earlier raw answers that failed.
    """

    kind: MemoryKind
    messages: list[dict]
    raw_output: str | None
    operations: tuple[Operation, ...]
    rejected: tuple[str, ...]
    error: str | None
    parsed: tuple[Operation, ...] = ()
    attempts: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    compression: CompressionRecord | None = None
    entry_ids: tuple[str, ...] = ()  # the entries shown in the prompt
    omitted_turns: tuple[str, ...] = ()
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        return {
            "kind": self.kind.value, "messages": self.messages, "raw_output": self.raw_output,
            "operations": [operation_to_dict(op) for op in self.operations],
            "parsed": [operation_to_dict(op) for op in self.parsed],
            "rejected": list(self.rejected), "error": self.error, "attempts": list(self.attempts),
            "notes": list(self.notes), "compression": self.compression.to_dict() if self.compression else None,
            "entry_ids": list(self.entry_ids), "omitted_turns": list(self.omitted_turns),
            "elapsed_s": self.elapsed_s,
        }


@dataclass(frozen=True)
class SessionRecord:
    owner: str
    session_id: str
    state_before: BankState | None  # None when the builder was told not to snapshot
    agents: dict[MemoryKind, AgentRecord]
    result: ApplyResult
    session_index: int = 0
    backend: str = ""

    @property
    def errors(self) -> dict[MemoryKind, str]:
        return {k: r.error for k, r in self.agents.items() if r.error is not None}

    def to_dict(self, *, with_state: bool = False) -> dict:
        """JSON-ready record; the state before is kept as a digest unless `with_state`."""
        out = {
            "owner": self.owner, "session_id": self.session_id, "session_index": self.session_index,
            "backend": self.backend,
            "state_before_sha256": state_digest(self.state_before) if self.state_before else None,
            "agents": {k.value: r.to_dict() for k, r in self.agents.items()},
            "result": {"created": list(self.result.created), "updated": list(self.result.updated),
                       "retired": list(self.result.retired), "core_changed": self.result.core_changed,
                       "rejected": [r.reason for r in self.result.rejected]},
        }
        if with_state and self.state_before is not None:
            out["state_before"] = self.state_before.to_dict()
        return out


@dataclass
class _Outcome:
    reply: AgentReply | None = None
    error: str | None = None
    raw_output: str | None = None
    attempts: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    elapsed_s: float = 0.0
    operations: list[Operation] = field(default_factory=list)


def _proposed_core(core: str, ops: Sequence[Operation]) -> str:
    """The core block the agent's operations would give if there were no limit (as the bank joins)."""
    text = core
    for op in ops:
        if isinstance(op, CoreAppend):
            text = f"{text}\n{op.content}" if text else op.content
        elif isinstance(op, CoreReplace):
            if op.old_text in text:
                text = text.replace(op.old_text, op.new_text, 1)
        elif isinstance(op, CoreRewrite):
            text = op.content
    return text


class MemoryBuilder:
    """Builds memory session by session with four agents on one backend (see the module doc)."""

    def __init__(self, backend: AgentBackend, *, top_k: int = DEFAULT_TOP_K, max_workers: int = 4,
                 max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS, max_turn_chars: int = DEFAULT_MAX_TURN_CHARS,
                 max_entry_chars: int = DEFAULT_MAX_ENTRY_CHARS, compress_core: bool = True,
                 agent_timeout_s: float | None = None, snapshots: bool = True):
        if not isinstance(backend, AgentBackend):
            raise InvalidInputError(f"backend must have a name and a generate() method, got {type(backend).__name__}")
        if max_workers < 1:
            raise InvalidInputError(f"max_workers must be >= 1, got {max_workers}")
        if agent_timeout_s is not None and agent_timeout_s <= 0:
            raise InvalidInputError(f"agent_timeout_s must be > 0, got {agent_timeout_s}")
        self.backend = backend
        self.top_k = top_k
        self.max_workers = max_workers
        self.max_prompt_chars = max_prompt_chars
        self.max_turn_chars = max_turn_chars
        self.max_entry_chars = max_entry_chars
        self.compress_core = compress_core
        self.agent_timeout_s = agent_timeout_s
        self.snapshots = snapshots

    def render(self, bank: MemoryBank, session: Session, *, speakers: Sequence[str] | None = None
               ) -> dict[MemoryKind, RenderedPrompt]:
        """The four prompts this builder would send for `session` against the bank's current state."""
        return render_session_prompts(bank, session, top_k=self.top_k, speakers=speakers,
                                      max_prompt_chars=self.max_prompt_chars, max_turn_chars=self.max_turn_chars,
                                      max_entry_chars=self.max_entry_chars)

    def add_session(self, bank: MemoryBank, session: Session, *, session_index: int = 0,
                    annotation: SessionAnnotation | None = None,
                    speakers: Sequence[str] | None = None) -> SessionRecord:
        """Run the four agents on `session` and apply their operations in one transaction."""
        if not isinstance(session, Session):
            raise InvalidInputError(f"session must be a membuilder.datasets.Session, got {type(session).__name__}")
        speakers = tuple(speakers) if speakers else speakers_of(session)
        prompts = self.render(bank, session, speakers=speakers)
        # after rendering: a first search may (re)write stored embeddings, never entries
        state_before = bank.snapshot() if self.snapshots else None
        core = bank.core
        contexts = {kind: AgentContext(owner=bank.owner, session=session, session_index=session_index,
                                       annotation=annotation, core=core, entries=prompts[kind].entries,
                                       speakers=speakers, core_limit=bank.core_limit)
                    for kind in AGENT_KINDS}
        outcomes = self._run_agents(prompts, contexts)
        parsed: dict[MemoryKind, tuple[Operation, ...]] = {}
        for kind, outcome in outcomes.items():
            if outcome.error is not None:
                continue
            result = parse_agent_output(kind, outcome.reply.text)
            if result.ok:
                parsed[kind] = result.operations
                outcome.operations = list(result.operations)
            else:
                outcome.error = f"unparsable answer: {result.error}"

        compression = None
        core_rejected: list[str] = []
        core_out = outcomes[MemoryKind.CORE]
        if core_out.error is None and core_out.operations:
            proposed = _proposed_core(core, core_out.operations)
            if len(proposed) > bank.core_limit:
                core_rejected.append(f"the core change would make the block {len(proposed)} characters, "
                                     f"over the limit of {bank.core_limit}")
                if self.compress_core:
                    compression = self._compress(proposed, contexts[MemoryKind.CORE])
                    if compression.operation is not None:
                        core_out.operations = [compression.operation]
                    else:
                        core_out.error = f"core change over the limit and compression failed: {compression.error}"
                        core_out.operations = []
                else:
                    core_out.error = "core change over the limit (compression is off)"
                    core_out.operations = []

        batch: list[Operation] = []
        owners: list[tuple[MemoryKind, int]] = []
        for kind in AGENT_KINDS:
            for j, op in enumerate(outcomes[kind].operations):
                batch.append(op)
                owners.append((kind, j))
        result = bank.apply(batch, session_id=session.session_id, skip_invalid=True)
        rejected: dict[MemoryKind, list[str]] = {kind: [] for kind in AGENT_KINDS}
        rejected[MemoryKind.CORE].extend(core_rejected)
        dropped: set[int] = set()
        for r in result.rejected:
            kind, j = owners[r.index]
            dropped.add(r.index)
            rejected[kind].append(f"operations[{j}] {r.operation.action}: {r.reason}")
        applied: dict[MemoryKind, list[Operation]] = {kind: [] for kind in AGENT_KINDS}
        for i, (op, (kind, _)) in enumerate(zip(batch, owners)):
            if i not in dropped:
                applied[kind].append(op)

        records = {}
        for kind in AGENT_KINDS:
            out = outcomes[kind]
            prompt = prompts[kind]
            records[kind] = AgentRecord(
                kind=kind, messages=prompt.messages, raw_output=out.raw_output, operations=tuple(applied[kind]),
                rejected=tuple(rejected[kind]), error=out.error, parsed=parsed.get(kind, ()),
                attempts=out.attempts, notes=out.notes,
                compression=compression if kind is MemoryKind.CORE else None,
                entry_ids=tuple(e.id for e in prompt.entries), omitted_turns=prompt.omitted_turns,
                elapsed_s=out.elapsed_s)
        return SessionRecord(owner=bank.owner, session_id=session.session_id, state_before=state_before,
                             agents=records, result=result, session_index=session_index,
                             backend=self.backend.name)

    def build(self, bank: MemoryBank, conversation: Conversation, *, max_sessions: int | None = None,
              start: int = 0, progress: bool = False,
              on_record: Callable[[SessionRecord], None] | None = None) -> list[SessionRecord]:
        """Add the conversation's sessions in order (from `start`, at most `max_sessions`).

        The conversation's annotations go to the matching sessions; `on_record` is called after each
        session (e.g. to append the record to a JSONL file, so a crash loses nothing done).
        """
        if max_sessions is not None and max_sessions < 0:
            raise InvalidInputError(f"max_sessions must be >= 0, got {max_sessions}")
        annotations = {a.session_id: a for a in conversation.annotations}
        end = len(conversation.sessions) if max_sessions is None else min(len(conversation.sessions),
                                                                          start + max_sessions)
        records = []
        for index in tqdm(range(start, end), desc=f"build {conversation.conversation_id}", disable=not progress):
            session = conversation.sessions[index]
            record = self.add_session(bank, session, session_index=index,
                                      annotation=annotations.get(session.session_id),
                                      speakers=conversation.speakers)
            records.append(record)
            if on_record is not None:
                on_record(record)
        return records

    # --- internals ------------------------------------------------------------------------------

    def _call(self, kind: MemoryKind, messages: list[dict], context: AgentContext) -> _Outcome:
        started = time.perf_counter()
        try:
            reply = run_backend(self.backend, kind, messages, context)
            out = _Outcome(reply=reply, raw_output=reply.text, attempts=reply.attempts, notes=reply.notes)
        except AgentGenerationError as exc:
            out = _Outcome(error=str(exc), raw_output=exc.raw_output, attempts=exc.attempts, notes=exc.notes)
        except Exception as exc:  # any backend failure is this agent's error, reported in its record
            out = _Outcome(error=f"{type(exc).__name__}: {exc}")
        out.elapsed_s = time.perf_counter() - started
        return out

    def _run_agents(self, prompts: dict[MemoryKind, RenderedPrompt],
                    contexts: dict[MemoryKind, AgentContext]) -> dict[MemoryKind, _Outcome]:
        pool = ThreadPoolExecutor(max_workers=min(self.max_workers, len(AGENT_KINDS)))
        try:
            futures = {kind: pool.submit(self._call, kind, prompts[kind].messages, contexts[kind])
                       for kind in AGENT_KINDS}
            wait(futures.values(), timeout=self.agent_timeout_s)
        finally:
            # a late agent's thread is left to finish on its own; its answer is never used
            pool.shutdown(wait=False, cancel_futures=True)
        outcomes = {}
        for kind, future in futures.items():
            if future.done() and not future.cancelled():
                outcomes[kind] = future.result()
            else:
                outcomes[kind] = _Outcome(error=f"no answer within agent_timeout_s={self.agent_timeout_s}",
                                          elapsed_s=self.agent_timeout_s or 0.0)
        return outcomes

    def _compress(self, proposed: str, context: AgentContext) -> CompressionRecord:
        limit = context.core_limit
        messages = render_compression_prompt(proposed, core_limit=limit, max_prompt_chars=self.max_prompt_chars)
        outcome = self._call(MemoryKind.CORE, messages, replace(context, purpose="compress"))
        if outcome.error is not None:
            return CompressionRecord(messages, outcome.raw_output, None, outcome.error, len(proposed))
        result = parse_agent_output(MemoryKind.CORE, outcome.reply.text)
        error = None
        if not result.ok:
            error = f"unparsable answer: {result.error}"
        elif len(result.operations) != 1 or not isinstance(result.operations[0], CoreRewrite):
            error = f"expected one REWRITE, got {[op.action for op in result.operations]}"
        elif len(result.operations[0].content) > limit:
            error = f"the REWRITE has {len(result.operations[0].content)} characters, still over the limit of {limit}"
        op = result.operations[0] if error is None else None
        return CompressionRecord(messages, outcome.reply.text, op, error, len(proposed))
