"""The annotation expert: valid agent outputs from LoCoMo's per-session annotations, no LLM.

LoCoMo annotates every session with `observation` (facts, each with its speaker and turn ids) and
`event_summary` (events with the session's event date); `membuilder.datasets` loads them as
`SessionAnnotation`. The expert turns them into the four agents' answers:

- semantic: every fact becomes an ADD, stamped with the session date as `time` (facts such as
  "ran a charity race last Saturday" are relative to it). A fact whose normalised text (lower
  case, words only) equals an entry shown in the prompt gets a SKIP naming that entry; a fact
  repeated within the session is added once;
- episodic: every event becomes an ADD with the event date of `event_summary` (the session date
  when it has none); events already shown (same normalised text) or repeated are left out;
- core: facts that state identity (work, home, origin, family, partner, age, pets...) or a
  preference ("loves", "enjoys", "favorite"...) are copied into one APPEND, identity first, up to
  `core_session_chars` per session and never past `core_fill_chars` (default 90% of the limit, so
  the block stays under the limit with room to spare). Facts already in the block are not repeated;
- procedural: facts that match a routine / how-to keyword rule ("every day", "routine", "recipe",
  "how to", "workout"...) are copied into ADDs; most sessions give none.

What it does not do: it never emits UPDATE or MERGE. We looked for a simple, reliable rule to
detect a changed fact and found none: across the 2,541 LoCoMo observations no two are equal after
normalisation, and the pairs with the most word overlap are facts about different people
("Deborah has a pendant..." / "Jolene has a pendant...", Jaccard 0.8) or different facts ("Sam is
considering trying painting" / "... kayaking"), so a word-overlap rule would overwrite correct
memories. The keyword rules for core and procedural are heuristics: they miss some facts and take
some that a person would not. A session without annotations (LongMemEval, PerLTQA) gets an empty,
valid answer from every agent, and the reply's notes say so.
"""

from __future__ import annotations

import json
import re

from membuilder.types import MemoryKind

from .backends import AgentContext, AgentReply, DetailedAgentBackend

_IDENTITY = re.compile(
    r"\b(works? (?:as|at|for)|is an? \w+ by profession|lives? in|living in|moved (?:to|from)|grew up|"
    r"is from|comes from|born in|home country|married|husband|wife|divorced|single (?:parent|mom|dad)|"
    r"boyfriend|girlfriend|fianc[eé]e?|years old|identif(?:y|ies) as|trans woman|trans man|name is|"
    r"(?:pet|dog|cat|puppy|son|daughter) named|"
    r"has (?:a|an|one|two|three|four|five|\d+) (?:kids?|children|sons?|daughters?|sisters?|brothers?|"
    r"siblings?|pets?|dogs?|cats?|puppy|puppies))\b", re.I)
_PREFERENCE = re.compile(
    r"\b(favou?rite|loves|enjoys|likes|prefers|hates|dislikes|passionate about|is a fan of)\b", re.I)
_ROUTINE = re.compile(
    r"\b(routines?|every (?:day|morning|night|evening|week|weekend)|each (?:day|morning|night|evening|week)|"
    r"daily|weekly|recipes?|step[- ]by[- ]step|steps to|how to|habits?|regularly|workouts?)\b", re.I)

EMPTY = '{"operations": []}'


def normalise(text: str) -> str:
    """Lower-case words joined by single spaces: the expert's notion of 'the same text'."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


class AnnotationExpert(DetailedAgentBackend):
    """Offline expert from LoCoMo observation / event_summary annotations (see the module doc)."""

    name = "annotation"

    def __init__(self, *, core_session_chars: int = 600, core_fill_chars: int | None = None,
                 date_semantic: bool = True):
        if core_session_chars < 0:
            raise ValueError(f"core_session_chars must be >= 0, got {core_session_chars}")
        self.core_session_chars = core_session_chars
        self.core_fill_chars = core_fill_chars
        self.date_semantic = date_semantic

    def generate_reply(self, kind: MemoryKind, messages: list[dict], *, context: AgentContext) -> AgentReply:
        kind = MemoryKind.parse(kind)
        if context.purpose == "compress":
            return AgentReply(EMPTY, notes=("the annotation expert does not compress core memory",))
        ann = context.annotation
        if ann is None:
            return AgentReply(EMPTY, notes=(f"no annotation for {context.session.session_id}: "
                                            "the annotation expert has nothing to add",))
        if ann.session_id != context.session.session_id:
            raise ValueError(f"annotation of {ann.session_id} given for session {context.session.session_id}")
        if kind is MemoryKind.CORE:
            return self._core(context)
        if kind is MemoryKind.EPISODIC:
            return self._episodic(context)
        if kind is MemoryKind.SEMANTIC:
            return self._semantic(context)
        return self._procedural(context)

    # --- per kind -------------------------------------------------------------------------------

    def _session_date(self, context: AgentContext) -> str | None:
        if context.session.date is not None:
            return context.session.date.date().isoformat()
        ann = context.annotation
        return ann.date.date().isoformat() if ann is not None and ann.date is not None else None

    def _semantic(self, context: AgentContext) -> AgentReply:
        known = {normalise(e.text): e.id for e in context.entries}
        when = self._session_date(context) if self.date_semantic else None
        ops, seen, repeated = [], set(), 0
        for fact in context.annotation.observations:
            key = normalise(fact.text)
            if not key:
                continue
            if key in known:
                ops.append({"action": "SKIP", "reason": f"already stored as {known[key]}"})
            elif key in seen:
                repeated += 1
            else:
                seen.add(key)
                ops.append({"action": "ADD", "memory": fact.text.strip(), **({"time": when} if when else {})})
        notes = (f"{repeated} fact(s) repeated within the session added once",) if repeated else ()
        return AgentReply(_dump({"operations": ops}), notes=notes)

    def _episodic(self, context: AgentContext) -> AgentReply:
        ann = context.annotation
        when = ann.date.date().isoformat() if ann.date is not None else self._session_date(context)
        known = {normalise(e.text) for e in context.entries}
        ops, seen, dropped = [], set(), 0
        for event in ann.events:
            key = normalise(event.text)
            if not key or key in known or key in seen:
                dropped += bool(key)
                continue
            seen.add(key)
            ops.append({"action": "ADD", "memory": event.text.strip(), **({"time": when} if when else {})})
        notes = (f"{dropped} event(s) already stored or repeated were left out",) if dropped else ()
        return AgentReply(_dump({"operations": ops}), notes=notes)

    def _procedural(self, context: AgentContext) -> AgentReply:
        known = {normalise(e.text) for e in context.entries}
        ops, seen = [], set()
        for fact in context.annotation.observations:
            key = normalise(fact.text)
            if key and _ROUTINE.search(fact.text) and key not in known and key not in seen:
                seen.add(key)
                ops.append({"action": "ADD", "memory": fact.text.strip()})
        return AgentReply(_dump({"operations": ops}))

    def _core(self, context: AgentContext) -> AgentReply:
        fill = self.core_fill_chars if self.core_fill_chars is not None else int(context.core_limit * 0.9)
        fill = min(fill, context.core_limit)
        in_core = f" {normalise(context.core)} "
        ranked = []
        for i, fact in enumerate(context.annotation.observations):
            rank = 0 if _IDENTITY.search(fact.text) else 1 if _PREFERENCE.search(fact.text) else None
            if rank is not None:
                ranked.append((rank, i, fact.text.strip()))
        lines: list[str] = []
        left_out = 0
        length = len(context.core)
        for _, _, text in sorted(ranked):
            key = normalise(text)
            if not key or f" {key} " in in_core or any(normalise(x) == key for x in lines):
                continue
            added = len(text) + (1 if length else 0)  # the bank joins an APPEND with a newline
            if sum(len(x) + 1 for x in lines) + len(text) > self.core_session_chars or length + added > fill:
                left_out += 1
                continue
            lines.append(text)
            length += added
        notes = (f"{left_out} identity/preference fact(s) not copied to core (session share or fill limit)",) \
            if left_out else ()
        if not lines:
            return AgentReply(EMPTY, notes=notes)
        return AgentReply(_dump({"action": "APPEND", "content": "\n".join(lines)}), notes=notes)


def _dump(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False)
