"""The world expert: the exact answer of each of the four agents for a generated session, no LLM.

The generator knows what every session changes, as texts (`SessionPlan`); ids exist only in the
bank. `WorldExpert` is an agent backend that turns the plan into operations against what the
agent is shown (`AgentContext`: the entries in its prompt, with ids, and the core block):

- semantic / episodic / procedural: a new fact is an ADD (with the event date as `time`); a
  changed fact is an UPDATE of the shown entry whose text is exactly the fact's previous text; an
  occasion found to be one event is a MERGE of the shown entries holding its two partial texts
  (an UPDATE when only one of them is shown); a restated fact is a SKIP naming the shown entry.
  When the entry to change is not among those shown (the prompt holds the top-k only), the
  expert ADDs the new text: it may only name ids it was shown, like any agent. Notes say so;
- core: one operation: APPEND of the session's new lines, or REPLACE of a changed line
  (old_text -> new_text); if the old line is not in the block, the new line is appended. A
  session with nothing for an agent gets `{"operations": []}` (valid for core too; never SKIP);
- compression (never needed at the world's sizes, the block stays far below the limit): a
  REWRITE to the lines the block should hold, when they fit.

`build_expert_memory` runs the four-agent `MemoryBuilder` with this expert over a conversation.
"""

from __future__ import annotations

import json
from typing import Iterable

from membuilder.agents.backends import AgentContext, AgentGenerationError, AgentReply, DetailedAgentBackend
from membuilder.types import MemoryKind

from .model import SessionPlan, World, WorldConversation

EMPTY = '{"operations": []}'


def _dump(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False)


class WorldExpert(DetailedAgentBackend):
    """Offline expert for sessions of generated worlds (module doc). Stateless: safe to call
    concurrently, as `MemoryBuilder` does for the four agents."""

    name = "world"

    def __init__(self, conversations: World | WorldConversation | Iterable[WorldConversation]):
        if isinstance(conversations, WorldConversation):
            conversations = [conversations]
        self._plans: dict[str, tuple[SessionPlan, object]] = {}
        for wc in conversations:
            if not isinstance(wc, WorldConversation):
                raise TypeError(f"WorldExpert takes generated world conversations, got {type(wc).__name__}")
            for plan, session in zip(wc.plans, wc.conversation.sessions):
                self._plans[plan.session_id] = (plan, session.date)

    def plan_for(self, context: AgentContext) -> SessionPlan:
        sid = context.session.session_id
        if sid not in self._plans:
            raise AgentGenerationError(f"session {sid!r} is not a session of the worlds this expert was given")
        plan, when = self._plans[sid]
        if context.session.date != when:
            raise AgentGenerationError(f"session {sid!r} has date {context.session.date}, the world's has {when}: "
                                       "not the generated session")
        return plan

    def generate_reply(self, kind: MemoryKind, messages: list[dict], *, context: AgentContext) -> AgentReply:
        kind = MemoryKind.parse(kind)
        plan = self.plan_for(context)
        if context.purpose == "compress":
            if len(plan.core_after) > context.core_limit or not plan.core_after:
                raise AgentGenerationError(f"the world's core block for {plan.session_id} has "
                                           f"{len(plan.core_after)} characters; it cannot be compressed under "
                                           f"{context.core_limit} by the expert")
            return AgentReply(_dump({"action": "REWRITE", "content": plan.core_after}))
        if kind is MemoryKind.CORE:
            return self._core(plan, context.core)
        return self._entries(plan, kind, context)

    def _core(self, plan: SessionPlan, core: str) -> AgentReply:
        lines = set(core.split("\n")) if core else set()
        appends, ops, notes = [], [], []
        for intent in plan.core:
            if intent.old is not None and intent.old in core:
                ops.append({"action": "REPLACE", "old_text": intent.old, "new_text": intent.new})
            elif intent.new not in lines:
                if intent.old is not None:
                    notes.append(f"core line {intent.old!r} is not in the block; its new version is appended")
                appends.append(intent.new)
        if appends:
            ops.append({"action": "APPEND", "content": "\n".join(appends)})
        if not ops:
            return AgentReply(EMPTY, notes=tuple(notes))
        return AgentReply(_dump(ops[0] if len(ops) == 1 else {"operations": ops}), notes=tuple(notes))

    def _entries(self, plan: SessionPlan, kind: MemoryKind, context: AgentContext) -> AgentReply:
        shown: dict[str, str] = {}
        for entry in context.entries:  # most relevant first; a duplicated text keeps its first id
            shown.setdefault(entry.text, entry.id)
        ops, notes = [], []
        for intent in plan.entries_of(kind):
            when = {"time": intent.time} if intent.time else {}
            if intent.restate:
                if intent.text in shown:
                    ops.append({"action": "SKIP", "reason": f"already stored as {shown[intent.text]}"})
                    continue
                notes.append(f"restated fact not shown, added: {intent.text!r}")
                ops.append({"action": "ADD", "memory": intent.text, **when})
                continue
            ids = list(dict.fromkeys(shown[t] for t in intent.replaces if t in shown))
            if len(ids) >= 2:
                ops.append({"action": "MERGE", "ids": ids, "new_memory": intent.text, **when})
            elif len(ids) == 1:
                ops.append({"action": "UPDATE", "id": ids[0], "new_memory": intent.text, **when})
            else:
                if intent.replaces:
                    notes.append(f"entry to change not shown, added instead: {intent.replaces[0]!r}")
                ops.append({"action": "ADD", "memory": intent.text, **when})
            if intent.replaces and 0 < len(ids) < len(intent.replaces):
                notes.append(f"{len(intent.replaces) - len(ids)} of the entries to merge not shown")
        return AgentReply(_dump({"operations": ops}), notes=tuple(notes))


def build_expert_memory(conversation: WorldConversation, *, bank=None, embedder=None, max_sessions: int | None = None,
                        snapshots: bool = False, progress: bool = False, **builder_options):
    """Build memory for `conversation` with the world expert through `MemoryBuilder`.

    Returns (bank, session records). Without `bank`, an in-memory bank owned by the conversation
    id is made (with `embedder`, default none: BM25 only). `builder_options` go to `MemoryBuilder`
    (e.g. `top_k`); the records hold each agent's raw answer (`records[i].agents[kind].raw_output`).
    """
    from membuilder.agents import MemoryBuilder
    from membuilder.bank import MemoryBank
    from membuilder.store import InMemoryStore

    if bank is None:
        bank = MemoryBank(InMemoryStore(), conversation.conversation_id, embedder=embedder)
    builder_options.setdefault("max_workers", 1)  # the expert is instant: threads would only add overhead
    builder = MemoryBuilder(WorldExpert(conversation), snapshots=snapshots, **builder_options)
    records = builder.build(bank, conversation.conversation, max_sessions=max_sessions, progress=progress)
    return bank, records
