"""Facts of the world: their memory text (what the expert stores) and the questions they answer.

A `Fact` is one memory-worthy thing about a person (a core line, an entity such as a pet, an
event, a routine) with named attributes. The generator changes attributes session by session;
`Fact.text` is the memory entry (or core line) for the current attributes, and `questions` the
questions its current attributes answer, each with the exact gold answer taken from the attribute
and the question's evidence: the sessions that stated or changed that attribute, plus the session
that introduced the fact (which is what links e.g. "Ada" to "Maya's sister").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

from membuilder.types import MemoryKind

from .dates import date_text

CORE_LINES = {
    "age": "{p} is {v} years old.",
    "city": "{p} lives in {v}.",
    "job": "{p} works as {a} {v}.",
    "hometown": "{p} grew up in {v}.",
    "food": "{p}'s favourite food is {v}.",
    "music": "{p} loves {v} music.",
    "hobby": "{p}'s favourite pastime is {v}.",
}
CORE_QUESTIONS = {
    "age": "How old is {p}?",
    "city": "Which city does {p} live in{now}?",
    "job": "What does {p} do for a living{now}?",
    "hometown": "Where did {p} grow up?",
    "food": "What is {p}'s favourite food?",
    "music": "What kind of music does {p} love?",
    "hobby": "What is {p}'s favourite pastime?",
}
PRONOUNS = {"sister": ("she", "her"), "brother": ("he", "him"), "cousin": ("they", "them")}


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


@dataclass(frozen=True)
class QSpec:
    """One question a fact answers now. `attr` names what it asks about."""

    attr: str
    question: str
    answer: str
    temporal: bool = False
    linked: bool = False  # needs another fact's session (a name said earlier): cross-session first


@dataclass
class Fact:
    key: str
    ftype: str  # core, pet, sibling, car, cafe, event, plan, shared_a, shared_b, shared, procedure
    kind: MemoryKind
    owner: str
    attrs: dict
    intro: int  # session index that introduced it
    sessions: dict[str, list[int]] = field(default_factory=dict)
    turns: dict[str, list[str]] = field(default_factory=dict)
    changes: dict[str, int] = field(default_factory=dict)
    links: list[int] = field(default_factory=list)  # sessions of other facts this one relies on
    link_turns: list[str] = field(default_factory=list)
    last: int = -1  # the last session that stated or changed anything of it

    def touch(self, attr: str, session: int, *, changed: bool) -> None:
        self.last = max(self.last, session)
        self.sessions.setdefault(attr, [])
        if session not in self.sessions[attr]:
            self.sessions[attr].append(session)
        if changed:
            self.changes[attr] = self.changes.get(attr, 0) + 1

    def evidence(self, attrs: tuple[str, ...]) -> tuple[list[int], list[str]]:
        sessions = sorted({self.intro, *self.links, *(s for a in attrs for s in self.sessions.get(a, ()))})
        turns = list(dict.fromkeys([*self.link_turns, *(t for a in ("intro", *attrs) for t in self.turns.get(a, ()))]))
        return sessions, turns

    def changed(self, attrs: tuple[str, ...]) -> bool:
        return any(self.changes.get(a, 0) for a in attrs)

    @property
    def text(self) -> str:
        return render(self)


def _d(value: date) -> str:
    return date_text(value)


def render(f: Fact) -> str:
    """The memory text of a fact's current attributes."""
    p, a = f.owner, f.attrs
    if f.ftype == "core":
        return CORE_LINES[a["attr"]].format(p=p, v=a["value"], a=article(str(a["value"])))
    if f.ftype == "pet":
        treat = f" who loves {a['treat']} as a treat" if a.get("treat") else ""
        return f"{p} has a {a['species']} named {a['name']}{treat}."
    if f.ftype == "sibling":
        job = f" and works as {article(a['job'])} {a['job']}" if a.get("job") else ""
        return f"{p}'s {a['relation']} {a['name']} lives in {a['city']}{job}."
    if f.ftype == "car":
        return f"{p}'s car is a {a['colour']} {a['model']}."
    if f.ftype == "cafe":
        known = f", known for its {a['specialty']}" if a.get("specialty") else ""
        return f"{p}'s favourite café is {a['name']} on {a['street']}{known}."
    if f.ftype == "event":
        return f"{p} {a['past']} on {_d(a['date'])}."
    if f.ftype == "plan":
        return f"{p} plans to {a['base']} on {_d(a['date'])}."
    if f.ftype == "shared_a":
        return f"{p} will attend {article(a['occasion'])} {a['occasion']} on {_d(a['date'])}."
    if f.ftype == "shared_b":
        return (f"{p}'s {a['relation']} {a['host']} will have {article(a['occasion'])} {a['occasion']} "
                f"on {_d(a['date'])}.")
    if f.ftype == "shared":
        return (f"{a['guest']} and {p} will both attend the {a['occasion']} of {p}'s {a['relation']} "
                f"{a['host']} on {_d(a['date'])}; {a['host']} is an old friend of {a['guest']}.")
    if f.ftype == "procedure":
        steps = "; ".join(f"{i + 1}) {s}" for i, s in enumerate(a["steps"]))
        title = f"{p}'s recipe for {a['name']}" if a["category"] == "recipe" else f"{p}'s {a['name']}"
        return f"{title}: {steps}."
    raise ValueError(f"unknown fact type {f.ftype!r}")


def questions(f: Fact, combo_count: int = 1) -> list[tuple[QSpec, tuple[str, ...]]]:
    """The questions the fact answers now, each with the attributes it depends on.

    `combo_count`: how many events of this owner share this one's description; when more than
    one, "When did ...?" would be ambiguous and the question asks what happened on the date.
    """
    p, a = f.owner, f.attrs
    if f.ftype == "core":
        now = " now" if f.changed(("value",)) else ""
        q = CORE_QUESTIONS[a["attr"]].format(p=p, now=now)
        return [(QSpec("value", q, str(a["value"])), ("value",))]
    if f.ftype == "pet":
        out = [(QSpec("name", f"What is the name of {p}'s {a['species']}{_now(f, 'name')}?", a["name"]), ("name",))]
        if a.get("treat"):
            out.append((QSpec("treat", f"What does {p}'s {a['species']} love as a treat{_now(f, 'treat')}?",
                              a["treat"]), ("treat",)))
        return out
    if f.ftype == "sibling":
        rel = a["relation"]
        out = [(QSpec("name", f"What is the name of {p}'s {rel}?", a["name"]), ("name",)),
               (QSpec("city", f"Where does {p}'s {rel} live{_now(f, 'city')}?", a["city"]), ("city",))]
        if a.get("job"):
            out.append((QSpec("job", f"What does {p}'s {rel} do for work{_now(f, 'job')}?", a["job"]), ("job",)))
        return out
    if f.ftype == "car":
        return [(QSpec("car", f"What car does {p} drive{_now(f, 'car')}?", f"{a['colour']} {a['model']}"), ("car",))]
    if f.ftype == "cafe":
        out = [(QSpec("cafe", f"What is {p}'s favourite café{_now(f, 'cafe')}?", a["name"]), ("cafe",))]
        if a.get("specialty"):
            out.append((QSpec("specialty", f"What is {p}'s favourite café known for?", a["specialty"]), ("specialty",)))
        return out
    if f.ftype == "event" and "ask" in a:
        question, answer = a["ask"]
        return [(QSpec("date", question, answer, True, linked=True), ("date",))]
    if f.ftype == "event":
        if combo_count > 1:
            return [(QSpec("date", f"What did {p} do on {_d(a['date'])}?", a["past"], True), ("date",))]
        return [(QSpec("date", f"When did {p} {a['base']}?", _d(a["date"]), True), ("date",))]
    if f.ftype == "plan":
        if combo_count > 1 and f.changed(("date",)):  # ambiguous by name: told apart by the first date
            return [(QSpec("date", f"When does {p} plan to {a['base']}, first planned for {_d(a['first_date'])}?",
                           _d(a["date"]), True), ("date",))]
        if combo_count > 1:
            return [(QSpec("date", f"What does {p} plan to do on {_d(a['date'])}?", a["base"], True), ("date",))]
        return [(QSpec("date", f"When does {p} plan to {a['base']}{_now(f, 'date')}?", _d(a["date"]), True),
                 ("date",))]
    if f.ftype == "shared_a":
        return [(QSpec("date", f"When will {p} attend {article(a['occasion'])} {a['occasion']}?",
                       _d(a["date"]), True), ("date",))]
    if f.ftype == "shared_b":
        return [(QSpec("date", f"When will {p}'s {a['relation']} {a['host']} have {article(a['occasion'])} "
                               f"{a['occasion']}?", _d(a["date"]), True), ("date",))]
    if f.ftype == "shared":
        return [(QSpec("host", f"Whose {a['occasion']} will {a['guest']} attend on {_d(a['date'])}?", a["host"]),
                 ("host",))]
    if f.ftype == "procedure":
        k = a["ask"]
        title = f"{p}'s recipe for {a['name']}" if a["category"] == "recipe" else f"{p}'s {a['name']}"
        attr = f"step{k}"
        return [(QSpec(attr, f"What is step {k + 1} of {title}{_now(f, attr)}?", a["steps"][k]), (attr,))]
    raise ValueError(f"unknown fact type {f.ftype!r}")


def _now(f: Fact, attr: str) -> str:
    return " now" if f.changes.get(attr, 0) else ""
