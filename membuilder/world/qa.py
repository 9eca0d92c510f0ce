"""Questions of the world with exact gold answers: per session (dense rewards) and per conversation.

Types (`reward.types.QA_TYPES`), decided from what the question depends on, in this order:
- abstention: asks about a topic no dialogue ever mentions (`vocab.RESERVED_TOPICS`); gold is
  `NOT_ANSWERABLE`;
- knowledge-update: what it asks was changed at least once; gold is the latest value;
- temporal: asks for (or by) an event's date, which the dialogue gave as a relative expression;
- cross-session: its evidence lies in two or more sessions (e.g. a sibling named in one session,
  her job in another; an occasion mentioned by each speaker and linked in a third; "I visited my
  sister" when her name was said in an earlier session); such a question may name a date;
- single-session: everything it needs was said in one session.

Session QA (asked right after session i, dated with its session date): every question on what
session i stated or changed (at most `MAX_OWN`), one abstention, and questions on earlier facts
until there are at least `MIN_SESSION_QA`. Conversation-level QA (dated the day after the last
session): every question on the final state of every fact (plain date questions sampled down to at
most as many as the others, at least 10), plus abstentions.
"""

from __future__ import annotations

from datetime import datetime, time, timedelta
from typing import TYPE_CHECKING

from . import vocab as V
from .facts import Fact, QSpec, questions
from .model import ABSTENTION_ANSWER, WorldQA

if TYPE_CHECKING:
    from .generator import _Simulation

MIN_SESSION_QA = 5
MAX_OWN = 6


def qtype_of(fact: Fact, spec: QSpec, attrs: tuple[str, ...]) -> str:
    if fact.changed(attrs):
        return "knowledge-update"
    sessions, _ = fact.evidence(attrs)
    if spec.linked and len(sessions) >= 2:
        return "cross-session"
    if spec.temporal:
        return "temporal"
    return "cross-session" if len(sessions) >= 2 else "single-session"


class QABuilder:
    """Makes the questions of one simulation (reads its facts; draws from its generator)."""

    def __init__(self, sim: "_Simulation"):
        self.sim = sim

    def _session_id(self, index: int) -> str:
        return f"{self.sim.cid}-s{index + 1}"

    def _specs(self, fact: Fact) -> list[tuple[QSpec, tuple[str, ...]]]:
        count = self.sim.combos[(fact.owner, fact.attrs["combo"])] if "combo" in fact.attrs else 1
        return questions(fact, count)

    def _item(self, qid: str, fact: Fact, spec: QSpec, attrs: tuple[str, ...], when: datetime,
              index: int) -> WorldQA:
        sessions, turns = fact.evidence(attrs)
        return WorldQA(question_id=qid, question=spec.question, answer=spec.answer,
                       qtype=qtype_of(fact, spec, attrs), question_date=when,
                       evidence_sessions=tuple(self._session_id(s) for s in sessions),
                       evidence_turns=tuple(turns), fact=fact.key, session_index=index, attr=spec.attr)

    def _abstentions(self, n: int, taken: set[str], prefix: str, start: int, when: datetime,
                     index: int) -> list[WorldQA]:
        combos = [(t, p) for t in range(len(V.RESERVED_TOPICS)) for p in self.sim.people]
        free = [c for c in combos if V.RESERVED_TOPICS[c[0]][1].format(p=c[1]) not in taken]
        out = []
        for k, (t, p) in enumerate(self.sim.rng.sample(free, min(n, len(free)))):
            out.append(WorldQA(question_id=f"{prefix}{start + k}", question=V.RESERVED_TOPICS[t][1].format(p=p),
                               answer=ABSTENTION_ANSWER, qtype="abstention", question_date=when,
                               evidence_sessions=(), evidence_turns=(), fact=f"abstention:{t}:{p}",
                               session_index=index))
        return out

    def session_questions(self, session_id: str, touched: list[tuple[Fact, str]]) -> list[WorldQA]:
        sim = self.sim
        when, index, prefix = sim.moment, sim.i, f"{session_id}/qa"
        chosen: list[tuple[Fact, QSpec, tuple[str, ...]]] = []
        seen: set[str] = set()
        for fact, attr in touched:
            if sim.facts.get(fact.key) is not fact:
                continue  # merged away in this session
            for spec, attrs in self._specs(fact):
                if attr in attrs and spec.question not in seen:
                    seen.add(spec.question)
                    chosen.append((fact, spec, attrs))
        # dated events are the most frequent facts: the others go first, so that the mix stays near
        # DESIGN section 4's (about half single-session, a third cross-session, a fifth temporal)
        chosen = sorted(chosen, key=lambda c: c[1].temporal and not c[1].linked)[:MAX_OWN]
        need = max(0, MIN_SESSION_QA - 1 - len(chosen))
        facts = list(sim.facts.values())  # a sample is enough: long conversations hold thousands
        pool = sim.rng.sample(facts, min(len(facts), 4 * need + 8)) if need else []
        older = [(f, spec, attrs) for f in pool for spec, attrs in self._specs(f) if spec.question not in seen]
        undated = [c for c in older if not c[1].temporal]
        picked = sim.rng.sample(undated, min(need, len(undated)))
        dated = [c for c in older if c[1].temporal]
        chosen += picked + sim.rng.sample(dated, min(need - len(picked), len(dated)))
        items = [self._item(f"{prefix}{k}", f, spec, attrs, when, index) for k, (f, spec, attrs) in enumerate(chosen)]
        n_abstain = max(1, MIN_SESSION_QA - len(items))
        items += self._abstentions(n_abstain, {q.question for q in items}, prefix, len(items), when, index)
        return items

    def conversation_questions(self) -> list[WorldQA]:
        sim = self.sim
        last = sim.moment
        when = datetime.combine(last.date() + timedelta(days=1), time(12, 0))
        index, prefix = len(sim.sessions) - 1, f"{sim.cid}/q"
        specs = [(fact, spec, attrs) for fact in sim.facts.values() for spec, attrs in self._specs(fact)]
        # long conversations pile up dated events: at most as many plain date questions as others
        dated = [n for n, (_, spec, _) in enumerate(specs) if spec.temporal and not spec.linked]
        keep = set(range(len(specs))) - set(dated)
        keep |= set(sim.rng.sample(dated, min(len(dated), max(len(keep), 10))))
        items = []
        for n, (fact, spec, attrs) in enumerate(specs):
            if n in keep:
                items.append(self._item(f"{prefix}{len(items)}", fact, spec, attrs, when, index))
        items += self._abstentions(max(3, len(items) // 8), set(), prefix, len(items), when, index)
        return items
