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
4. all parsed operations go to `bank.apply(..., skip_invalid=True)` once: one transaction
   (`membuilder.agents.apply.apply_agent_outputs`, which the reward uses too). The operations the
   bank rejects (an id that does not exist, the wrong kind, a REPLACE whose old_text is absent...)
   are dropped and their reasons recorded with the agent that wrote them; each record also
   carries the RL validity gate's verdict on the agent's answer (`AgentRecord.valid`).

Nothing is applied twice: a retried or re-asked agent contributes only its final answer, and a
late answer after `agent_timeout_s` is discarded. `add_session` is not idempotent: calling it twice
for one session applies that session's operations twice. The bank must not change under the
builder while a session is being added. A failure of the bank itself (store, embedder) raises,
leaving the bank as it was.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from tqdm import tqdm

from membuilder.bank import MemoryBank
from membuilder.datasets import Conversation, Session, SessionAnnotation
from membuilder.operations import CoreRewrite
from membuilder.snapshots import state_digest  # noqa: F401  (re-exported by membuilder.agents)
from membuilder.types import InvalidInputError, MemoryKind

from .apply import apply_agent_outputs
from .backends import AgentBackend, AgentContext, AgentGenerationError, AgentReply, run_backend
from .parsing import parse_agent_output
from .records import AgentRecord, CompressionRecord, SessionRecord  # noqa: F401  (moved there; re-exported)
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


# on_agent(session_index, kind, error): one agent of one session finished (error None on success)
AgentDoneHook = Callable[[int, MemoryKind, "str | None"], None]


@dataclass
class _Outcome:
    reply: AgentReply | None = None
    error: str | None = None
    raw_output: str | None = None
    attempts: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    elapsed_s: float = 0.0


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
                    speakers: Sequence[str] | None = None,
                    on_agent: AgentDoneHook | None = None) -> SessionRecord:
        """Run the four agents on `session` and apply their operations in one transaction.

        `on_agent(session_index, kind, error)` is called in this thread as each agent finishes
        (error None on success), before anything is applied: for progress within a session.
        """
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
        outcomes = self._run_agents(prompts, contexts, on_agent=on_agent, session_index=session_index)
        applied = apply_agent_outputs(
            bank, {kind: out.raw_output for kind, out in outcomes.items() if out.error is None},
            session_id=session.session_id,
            errors={kind: out.error for kind, out in outcomes.items() if out.error is not None},
            compress=(lambda proposed: self._compress(proposed, contexts[MemoryKind.CORE]))
            if self.compress_core else None)

        records = {}
        for kind in AGENT_KINDS:
            out, app, prompt = outcomes[kind], applied.agents[kind], prompts[kind]
            records[kind] = AgentRecord(
                kind=kind, messages=prompt.messages, raw_output=out.raw_output, operations=app.applied,
                rejected=app.rejected, error=app.error, parsed=app.parsed, attempts=out.attempts,
                notes=out.notes, compression=app.compression,
                entry_ids=tuple(e.id for e in prompt.entries), omitted_turns=prompt.omitted_turns,
                elapsed_s=out.elapsed_s, valid=app.valid)
        return SessionRecord(owner=bank.owner, session_id=session.session_id, state_before=state_before,
                             agents=records, result=applied.result, session_index=session_index,
                             backend=self.backend.name)

    def build(self, bank: MemoryBank, conversation: Conversation, *, max_sessions: int | None = None,
              start: int = 0, progress: bool = False,
              on_record: Callable[[SessionRecord], None] | None = None,
              on_agent: AgentDoneHook | None = None) -> list[SessionRecord]:
        """Add the conversation's sessions in order (from `start`, at most `max_sessions`).

        The conversation's annotations go to the matching sessions; `on_record` is called after each
        session (e.g. to append the record to a JSONL file, so a crash loses nothing done);
        `on_agent` as each agent of each session finishes (see `add_session`).
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
                                      speakers=conversation.speakers, on_agent=on_agent)
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
                    contexts: dict[MemoryKind, AgentContext], *, on_agent: AgentDoneHook | None = None,
                    session_index: int = 0) -> dict[MemoryKind, _Outcome]:
        pool = ThreadPoolExecutor(max_workers=min(self.max_workers, len(AGENT_KINDS)))
        try:
            futures = {kind: pool.submit(self._call, kind, prompts[kind].messages, contexts[kind])
                       for kind in AGENT_KINDS}
            kinds = {future: kind for kind, future in futures.items()}
            told: set[MemoryKind] = set()
            try:
                # as_completed rather than wait: the hook hears of each agent as soon as it is done
                for future in as_completed(kinds, timeout=self.agent_timeout_s):
                    if on_agent is not None:
                        on_agent(session_index, kinds[future], future.result().error)
                    told.add(kinds[future])
            except TimeoutError:
                pass
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
            if on_agent is not None and kind not in told:  # timed out, or finished as the time ran out
                on_agent(session_index, kind, outcomes[kind].error)
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
