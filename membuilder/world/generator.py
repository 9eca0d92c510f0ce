"""The seeded generator of the synthetic dialogue world (DESIGN section 4, "Bundled data").

`generate_world(seed, conversations=..., sessions=...)` makes multi-session chats between two
people. Everything comes from `random.Random` seeded by (seed, conversation index), so a world is
exactly reproducible from its int seed and sizes, and it nests: conversation k is the same in
every world of that seed, and the first n sessions of a conversation do not depend on how many
sessions follow (only the conversation-level questions, asked after the last session, do).

What a conversation holds (see `facts.py` for the memory texts):
- core: each person's age, city, job, home town and favourite food / music / pastime, stated in
  passing; city and job change later (core REPLACE, plus a dated episodic event);
- semantic: a pet, a sibling or cousin, a car, a favourite café, introduced and then refined
  (a pet's favourite treat, the sibling's job: UPDATE), changed (renamed pet, sibling moved, new
  car, new café: UPDATE), or restated (SKIP);
- episodic: past events and plans, said with relative dates ("last Tuesday", "in two weeks")
  that only the session date resolves (`dates.py`); plans get postponed (UPDATE); one occasion
  per conversation is mentioned by each speaker separately and later found to be the same event
  (MERGE of the two entries);
- procedural: recipes and routines told step by step, later revised (UPDATE);
- small talk, greetings and farewells that carry nothing.
Each session's `SessionPlan` lists the exact memory changes (texts; the `WorldExpert` maps them
to ids) and at least `MIN_SESSION_QA` questions answerable from memory after it.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta

from membuilder.datasets import Conversation, Message, Session
from membuilder.types import MemoryKind

from . import vocab as V
from .dates import date_text, future_expression, past_expression, resolve_relative, session_date_text
from .facts import PRONOUNS, Fact, article
from .model import CoreIntent, EntryIntent, SessionPlan, World, WorldConversation
from .qa import QABuilder

CORE_ATTRS = ("age", "city", "job", "hometown", "food", "music", "hobby")
ENTITY_TYPES = {"pet": 0.75, "sibling": 0.85, "car": 0.6, "cafe": 0.7}
MAX_SEED = 2**62


@dataclass
class _Beat:
    turns: list[tuple[str, str, bool]]  # (speaker, text, states the fact)
    intents: list = field(default_factory=list)
    touched: list[tuple[Fact, str]] = field(default_factory=list)
    free: bool = False  # small talk: speakers are set when laid out ("{a}" / "{b}" in texts)


ENTITY_FTYPES = ("core", "pet", "sibling", "car", "cafe", "procedure")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


class _Simulation:
    """One conversation, generated session by session."""

    def __init__(self, seed: int, index: int):
        # a str seed is hashed with SHA-512 by `random` (the same on every platform and run), and
        # distinct (seed, index) pairs never collide
        self.rng = random.Random(f"membuilder-world:{seed}:{index}")
        self.cid = f"world-{seed}-{index:03d}"
        rng = self.rng
        self.a, self.b = rng.sample(V.FIRST_NAMES, 2)
        self.people = (self.a, self.b)
        self.other = {self.a: self.b, self.b: self.a}
        start = date(2021, 1, 1) + timedelta(days=rng.randrange(4 * 365))
        self.moment = datetime.combine(start, time(rng.randrange(8, 21), rng.choice((0, 15, 30, 45))))
        self.profile: dict[str, dict] = {}
        for p in self.people:  # the two people never share a procedure
            self.profile[p] = self._profile({i for q in self.profile.values() for i in q["procedures"]})
        # introductions: core first (mostly), then entities and procedures, interleaved by chance
        intros = [(rng.random() * 2, p, "core", attr) for p in self.people for attr in CORE_ATTRS]
        for p in self.people:
            intros += [(1 + rng.random() * 3, p, ftype, None) for ftype in ENTITY_TYPES if ftype in self.profile[p]]
            intros += [(1.5 + rng.random() * 3, p, "procedure", i) for i in range(len(self.profile[p]["procedures"]))]
        self.pending = [(p, t, x) for _, p, t, x in sorted(intros, key=lambda r: r[0])]
        self.facts: dict[str, Fact] = {}
        self.entities: list[Fact] = []  # facts that are not events (what can change, be restated, linked)
        self.open_plans: list[Fact] = []  # plans whose date has not come yet
        self.combos: Counter = Counter()  # (owner, event description) -> events so described
        self.core_lines: list[str] = []
        self.event_counter = 0
        self.used_dates: dict[str, set[date]] = {p: set() for p in self.people}
        self.shared: dict | None = None  # the occasion that gets merged, once per conversation
        self.shared_done = False
        self.sessions: list[Session] = []
        self.plans: list[SessionPlan] = []
        self.qa = QABuilder(self)

    def _profile(self, taken: set[int]) -> dict:
        rng = self.rng
        prof = {"age": rng.randrange(24, 61), "city": rng.choice(V.CITIES), "job": rng.choice(V.JOBS),
                "hometown": rng.choice(V.HOMETOWNS), "food": rng.choice(V.FOODS), "music": rng.choice(V.MUSIC),
                "hobby": rng.choice(V.HOBBIES)}
        for ftype, chance in ENTITY_TYPES.items():
            if rng.random() < chance:
                prof[ftype] = True
        free = [i for i in range(len(V.PROCEDURES)) if i not in taken]
        prof["procedures"] = rng.sample(free, rng.choice((1, 2)))
        return prof

    # --- the session loop -----------------------------------------------------------------------

    def run(self, sessions: int) -> None:
        for i in range(sessions):
            if i:
                self.moment += timedelta(days=self.rng.randrange(2, 13), hours=self.rng.randrange(-3, 4))
                self.moment = self.moment.replace(hour=min(21, max(8, self.moment.hour)))
            self._session(i)

    def _session(self, i: int) -> None:
        rng = self.rng
        self.i, self.today = i, self.moment.date()
        self.touched_keys: set[str] = set()
        self.core_mode: str | None = None
        beats: list[_Beat] = []
        wanted = rng.randint(3, 5)
        for _ in range(wanted * 4):
            if len(beats) >= wanted:
                break
            beat = self._pick_beat(first=i == 0 and len(beats) < 3)
            if beat is not None:
                beats.append(beat)
        for talk in rng.sample(V.SMALL_TALK, rng.randint(1, 3)):
            beats.insert(rng.randrange(len(beats) + 1), _Beat([("", t, False) for t in talk], free=True))
        beats.insert(0, _Beat([("", t, False) for t in rng.choice(V.GREETINGS)], free=True))
        beats.append(_Beat([("", t, False) for t in rng.choice(V.FAREWELLS)], free=True))
        sid = f"{self.cid}-s{i + 1}"
        messages, core_intents, entry_intents = self._layout(beats, i)
        session = Session(session_id=sid, date=self.moment, date_text=session_date_text(self.moment),
                          messages=tuple(messages))
        self.sessions.append(session)
        touched = [(f, a) for beat in beats for f, a in beat.touched]
        qa = self.qa.session_questions(sid, touched)
        self.plans.append(SessionPlan(session_id=sid, session_index=i, core=tuple(core_intents),
                                      entries=tuple(entry_intents), core_after="\n".join(self.core_lines),
                                      qa=tuple(qa)))

    def _layout(self, beats: list[_Beat], i: int) -> tuple[list[Message], list, list]:
        """The session's turns (alternating speakers) and its intents; records evidence turn ids."""
        rng = self.rng
        messages: list[Message] = []
        core_intents, entry_intents = [], []

        def say(speaker: str, text: str) -> str:
            turn_id = f"D{i + 1}:{len(messages) + 1}"
            messages.append(Message(speaker=speaker, role="user" if speaker == self.a else "assistant",
                                    text=text, turn_id=turn_id))
            return turn_id

        for beat in beats:
            last = messages[-1].speaker if messages else None
            turns = beat.turns
            if beat.free:
                first = self.other[last] if last else rng.choice(self.people)
                names = {"a": first, "b": self.other[first]}
                turns = [(first if k % 2 == 0 else self.other[first], text.format(**names), False)
                         for k, (_, text, _) in enumerate(turns)]
            elif turns[0][0] == last:
                if len(turns) > 1 and not turns[0][2] and turns[1][0] != last:
                    turns = turns[1:]  # an optional question from the one who just spoke: left out
                else:
                    say(self.other[last], rng.choice(V.PROMPTS))
            evidence = []
            for speaker, text, states in turns:
                turn_id = say(speaker, text)
                if states:
                    evidence.append(turn_id)
            for fact, attr in beat.touched:
                fact.turns.setdefault(attr, []).extend(evidence)
                if fact.intro == i:  # what introduced the fact is evidence for every question on it
                    fact.turns.setdefault("intro", []).extend(evidence)
            for intent in beat.intents:
                (core_intents if isinstance(intent, CoreIntent) else entry_intents).append(intent)
        return messages, core_intents, entry_intents

    def _pick_beat(self, first: bool) -> _Beat | None:
        rng = self.rng
        options = []
        if self.pending:
            options.append((6.0 if first else 3.0, self._intro))
        if not first:
            options += [(1.1, self._past_event), (0.5, self._plan), (0.6, self._linked_event), (1.8, self._change),
                        (0.3, self._restate)]
            if not self.shared_done:
                options.append((1.2, self._shared))
        total = sum(w for w, _ in options)
        pick = rng.random() * total
        for weight, make in options:
            pick -= weight
            if pick <= 0:
                return make()
        return options[-1][1]()

    # --- helpers --------------------------------------------------------------------------------

    def _new_fact(self, key: str, ftype: str, kind: MemoryKind, owner: str, attrs: dict, attr_list) -> Fact:
        fact = Fact(key=key, ftype=ftype, kind=kind, owner=owner, attrs=attrs, intro=self.i)
        for attr in attr_list:
            fact.touch(attr, self.i, changed=False)
        self.facts[key] = fact
        if ftype in ENTITY_FTYPES:
            self.entities.append(fact)
        elif ftype == "plan":
            self.open_plans.append(fact)
        if "combo" in attrs:
            self.combos[(owner, attrs["combo"])] += 1
        self.touched_keys.add(key)
        return fact

    def _free(self, key: str) -> bool:
        return key not in self.touched_keys

    def _event_fact(self, owner: str, past: str, base: str, when: date) -> Fact:
        """A dated past event; events of one owner with the same `base` ("move to Porto") share a
        description, so their questions ask by date instead (`facts.questions`)."""
        self.event_counter += 1
        self.used_dates[owner].add(when)
        return self._new_fact(f"event:{self.event_counter}", "event", MemoryKind.EPISODIC, owner,
                              {"past": past, "base": base, "combo": f"past:{base}", "date": when}, ("date",))

    def _reaction(self, owner: str, change: bool = False) -> tuple[str, str, bool]:
        return (self.other[owner], self.rng.choice(V.CHANGE_REACTIONS if change else V.REACTIONS), False)

    # --- beats ----------------------------------------------------------------------------------

    def _intro(self) -> _Beat | None:
        for n, (p, ftype, detail) in enumerate(self.pending):
            if ftype == "core" and self.core_mode == "replace":
                continue
            key = f"core:{p}:{detail}" if ftype == "core" else f"{ftype}:{p}:{detail}" if ftype == "procedure" \
                else f"{ftype}:{p}"
            if not self._free(key):
                continue
            del self.pending[n]
            return getattr(self, f"_intro_{ftype}")(p, key, detail)
        return None

    def _intro_core(self, p: str, key: str, attr: str) -> _Beat:
        rng, v = self.rng, self.profile[p][attr]
        fact = self._new_fact(key, "core", MemoryKind.CORE, p, {"attr": attr, "value": v}, ("value",))
        a = article(str(v))
        says = {
            "age": ("How old are you now, if you don't mind me asking?",
                    [f"I'm {v} now, can you believe it?", f"Being {v} is great so far, honestly.",
                     f"Now that I'm {v}, I need more sleep than ever."]),
            "city": ("Where are you living these days?",
                     [f"I live in {v}.", f"I'm in {v} these days, I love it here.",
                      f"{v}! I've been living here for a while now."]),
            "job": ("What do you do for work again?",
                    [f"I'm {a} {v}.", f"I work as {a} {v}, it keeps me busy.",
                     f"I've been working as {a} {v} for a few years."]),
            "hometown": ("Where did you grow up?",
                         [f"I grew up in {v}.", f"I'm originally from {v}, actually.",
                          f"I grew up in {v}, it was so quiet there."]),
            "food": ("What's your favourite thing to eat?",
                     [f"Nothing beats {v}, it's my favourite food.", f"My favourite food is {v}, no contest.",
                      f"I could eat {v} every day, it's my all-time favourite food."]),
            "music": ("What are you listening to these days?",
                      [f"I love {v} music.", f"Mostly {v}, I'm obsessed with {v} music.",
                       f"Always {v} music, I can't get enough of it."]),
            "hobby": ("What do you do for fun?",
                      [f"{_cap(str(v))} is my favourite pastime.", f"My favourite pastime is {v}.",
                       f"I spend every free moment on {v}, it's my favourite pastime."]),
        }[attr]
        turns = [(self.other[p], says[0], False)] if rng.random() < 0.5 else []
        turns += [(p, rng.choice(says[1]), True), self._reaction(p)]
        self.core_mode = "append"
        self.core_lines.append(fact.text)
        return _Beat(turns, [CoreIntent(key, fact.text)], [(fact, "value")])

    def _intro_pet(self, p: str, key: str, _=None) -> _Beat:
        rng = self.rng
        species, name = rng.choice(V.PET_SPECIES), rng.choice(V.PET_NAMES)
        fact = self._new_fact(key, "pet", MemoryKind.SEMANTIC, p, {"species": species, "name": name}, ("name",))
        line = rng.choice([f"I have a {species} named {name}, {name} is the best.",
                           f"Have I told you about {name}? My {species}. Total troublemaker.",
                           f"My {species} {name} knocked over a plant again."])
        return _Beat([(p, line, True), self._reaction(p)], [EntryIntent(key, MemoryKind.SEMANTIC, fact.text)],
                     [(fact, "name")])

    def _intro_sibling(self, p: str, key: str, _=None) -> _Beat:
        rng = self.rng
        rel = rng.choice(V.RELATIONS)
        name = rng.choice(V.RELATIVE_NAMES[rel])
        city = rng.choice([c for c in V.CITIES if c != self.profile[p]["city"]])
        fact = self._new_fact(key, "sibling", MemoryKind.SEMANTIC, p, {"relation": rel, "name": name, "city": city},
                              ("name", "city"))
        obj = PRONOUNS[rel][1]
        line = rng.choice([f"My {rel} {name} lives in {city}, I really miss {obj}.",
                           f"I was on the phone with my {rel} {name}, who lives in {city}.",
                           f"I might visit my {rel} {name} in {city} at some point."])
        return _Beat([(p, line, True), self._reaction(p)], [EntryIntent(key, MemoryKind.SEMANTIC, fact.text)],
                     [(fact, "name"), (fact, "city")])

    def _intro_car(self, p: str, key: str, _=None) -> _Beat:
        rng = self.rng
        colour, model = rng.choice(V.CAR_COLOURS), rng.choice(V.CAR_MODELS)
        fact = self._new_fact(key, "car", MemoryKind.SEMANTIC, p, {"colour": colour, "model": model}, ("car",))
        line = rng.choice([f"I drive a {colour} {model}, nothing fancy.",
                           f"My {colour} {model} is in the shop again.",
                           f"Honestly my {colour} {model} has never let me down."])
        return _Beat([(p, line, True), self._reaction(p)], [EntryIntent(key, MemoryKind.SEMANTIC, fact.text)],
                     [(fact, "car")])

    def _intro_cafe(self, p: str, key: str, _=None) -> _Beat:
        rng = self.rng
        name, street = rng.choice(V.CAFE_NAMES), rng.choice(V.STREETS)
        fact = self._new_fact(key, "cafe", MemoryKind.SEMANTIC, p, {"name": name, "street": street}, ("cafe",))
        line = rng.choice([f"My favourite café is {name} on {street}.",
                           f"You have to try {name} on {street}, it's my favourite café.",
                           f"I'm writing this from {name} on {street}, my favourite café."])
        return _Beat([(p, line, True), self._reaction(p)], [EntryIntent(key, MemoryKind.SEMANTIC, fact.text)],
                     [(fact, "cafe")])

    def _intro_procedure(self, p: str, key: str, n: int) -> _Beat:
        rng = self.rng
        name, category, steps, _rev = V.PROCEDURES[self.profile[p]["procedures"][n]]
        ask = rng.randrange(len(steps))
        fact = self._new_fact(key, "procedure", MemoryKind.PROCEDURAL, p,
                              {"name": name, "category": category, "steps": tuple(steps), "ask": ask,
                               "revised": False, "index": self.profile[p]["procedures"][n]},
                              tuple(f"step{k}" for k in range(len(steps))))
        s = steps
        if category == "recipe":
            ask_line = f"How do you make your {name}?"
            line = rng.choice([f"My {name} recipe is easy: first I {s[0]}, then I {s[1]}, after that I {s[2]}, "
                               f"and finally I {s[3]}.",
                               f"Here's how I make {name}: {s[0]}, {s[1]}, {s[2]}, and then {s[3]}."])
        else:
            ask_line = f"What does your {name} look like?"
            line = rng.choice([f"My {name} is simple: first I {s[0]}, then I {s[1]}, after that I {s[2]}, "
                               f"and finally I {s[3]}.",
                               f"I stick to the same {name}: {s[0]}, {s[1]}, {s[2]}, then {s[3]}."])
        turns = [(self.other[p], ask_line, False)] if rng.random() < 0.5 else []
        turns += [(p, line, True), (self.other[p], rng.choice(("Sounds great.", "I might copy that!",
                                                               "That's so organised.")), False)]
        return _Beat(turns, [EntryIntent(key, MemoryKind.PROCEDURAL, fact.text)],
                     [(fact, f"step{k}") for k in range(len(steps))])

    def _past_event(self) -> _Beat | None:
        rng = self.rng
        p = rng.choice(self.people)
        past_t, base_t, slots = rng.choice(V.PAST_EVENTS)
        x = rng.choice(slots)
        expr = past_expression(rng)
        when = resolve_relative(expr, self.today)
        if when in self.used_dates[p]:
            return None
        past, base = past_t.format(x=x), base_t.format(x=x)
        fact = self._event_fact(p, past, base, when)
        line = rng.choice([f"{_cap(expr)} I {past}.", f"I {past} {expr}, it was great.",
                           f"Guess what? I {past} {expr}!", f"Did I tell you? I {past} {expr}."])
        turns = []
        if rng.random() < 0.4:
            turns.append((self.other[p], rng.choice(("What have you been up to?", "Anything fun lately?")), False))
        turns += [(p, line, True), self._reaction(p)]
        return _Beat(turns, [EntryIntent(fact.key, MemoryKind.EPISODIC, fact.text, when.isoformat())],
                     [(fact, "date")])

    def _linked_event(self) -> _Beat | None:
        """An event that names someone only by relation ("my sister"): the name is in an earlier session."""
        rng = self.rng
        known = [f for f in self.entities if f.ftype in ("sibling", "pet") and f.intro < self.i
                 and self._free(f.key)]
        if not known:
            return None
        other = rng.choice(known)
        p, a = other.owner, other.attrs
        expr = past_expression(rng)
        when = resolve_relative(expr, self.today)
        if when in self.used_dates[p]:
            return None
        self.touched_keys.add(other.key)
        if other.ftype == "sibling":
            past, base = f"visited {a['name']}, {p}'s {a['relation']}, in {a['city']}", f"visit {a['name']}"
            line = rng.choice([f"I went to see my {a['relation']} in {a['city']} {expr}, it was so good to see "
                               f"{PRONOUNS[a['relation']][1]}.",
                               f"{_cap(expr)} I visited my {a['relation']} in {a['city']}."])
            ask = (f"Who did {p} visit in {a['city']} on {date_text(when)}?", a["name"])
            attr = "name"
        else:
            past, base = f"took {p}'s {a['species']} {a['name']} to the vet", f"take {a['name']} to the vet"
            line = rng.choice([f"I had to take my {a['species']} to the vet {expr}, nothing serious.",
                               f"{_cap(expr)} my {a['species']} had a check-up at the vet, all good."])
            ask = (f"Which pet did {p} take to the vet on {date_text(when)}?", a["name"])
            attr = "name"
        fact = self._event_fact(p, past, base, when)
        fact.attrs["ask"] = ask
        fact.links = list(other.sessions.get(attr, [])) + [other.intro]
        fact.link_turns = list(other.turns.get("intro", [])) + list(other.turns.get(attr, []))
        return _Beat([(p, line, True), self._reaction(p)],
                     [EntryIntent(fact.key, MemoryKind.EPISODIC, fact.text, when.isoformat())], [(fact, "date")])

    def _plan(self) -> _Beat | None:
        rng = self.rng
        p = rng.choice(self.people)
        base_t, slots = rng.choice(V.PLANS)
        base = base_t.format(x=rng.choice(slots))
        expr = future_expression(rng)
        when = resolve_relative(expr, self.today)
        if when in self.used_dates[p]:
            return None
        self.event_counter += 1
        self.used_dates[p].add(when)
        fact = self._new_fact(f"plan:{self.event_counter}", "plan", MemoryKind.EPISODIC, p,
                              {"base": base, "combo": f"plan:{base}", "date": when, "first_date": when}, ("date",))
        line = rng.choice([f"I'm going to {base} {expr}.", f"{_cap(expr)} I'm planning to {base}.",
                           f"Exciting news, I'll {base} {expr}."])
        return _Beat([(p, line, True), self._reaction(p)],
                     [EntryIntent(fact.key, MemoryKind.EPISODIC, fact.text, when.isoformat())], [(fact, "date")])

    def _restate(self) -> _Beat | None:
        pets = [f for f in self.entities if f.ftype == "pet" and self._free(f.key) and f.intro < self.i]
        if not pets:
            return None
        fact = self.rng.choice(pets)
        self.touched_keys.add(fact.key)
        p, a = fact.owner, fact.attrs
        line = self.rng.choice([f"{a['name']} says hi, by the way, my {a['species']} is sitting right next to me.",
                                f"My {a['species']} {a['name']} is snoring next to me as we speak."])
        return _Beat([(p, line, False), (self.other[p], "Aww, give them a pat from me.", False)],
                     [EntryIntent(fact.key, MemoryKind.SEMANTIC, fact.text, restate=True)])

    # --- changes ----------------------------------------------------------------------------------

    def _change(self) -> _Beat | None:
        rng = self.rng
        self.open_plans = [f for f in self.open_plans if f.attrs["date"] > self.today + timedelta(days=1)]
        # a fact changes at most every third session (a plan: any later session before its date),
        # and moves / new jobs are rarer than the rest
        candidates = [f for f in (*self.entities, *self.open_plans)
                      if (f.last < self.i - 2 or f.ftype == "plan" and f.intro < self.i)
                      and self._free(f.key) and self._can_change(f)]
        if not candidates:
            return None
        weights = [0.15 if f.ftype == "core" else 1.0 for f in candidates]
        fact = rng.choices(candidates, weights)[0]
        self.touched_keys.add(fact.key)
        return getattr(self, f"_change_{fact.ftype}")(fact)

    def _can_change(self, f: Fact) -> bool:
        if f.ftype == "core":
            return f.attrs["attr"] in ("city", "job") and self.core_mode is None
        if f.ftype == "plan":
            return (f.attrs["date"] > self.today + timedelta(days=1) and not f.changes.get("date")
                    and f.attrs["date"] + timedelta(days=7) not in self.used_dates[f.owner])
        if f.ftype == "procedure":
            return not f.attrs["revised"]
        return True

    def _change_core(self, fact: Fact) -> _Beat | None:
        rng, p, attr = self.rng, fact.owner, fact.attrs["attr"]
        old_value = fact.attrs["value"]
        pool = V.CITIES if attr == "city" else V.JOBS
        new_value = rng.choice([v for v in pool if v != old_value])
        expr = past_expression(rng)
        when = resolve_relative(expr, self.today)
        if when in self.used_dates[p]:
            self.touched_keys.discard(fact.key)
            return None
        old_line = fact.text
        fact.attrs["value"] = new_value
        fact.touch("value", self.i, changed=True)
        self.profile[p][attr] = new_value
        self.core_lines[self.core_lines.index(old_line)] = fact.text
        self.core_mode = "replace"
        if attr == "city":
            past = f"moved from {old_value} to {new_value}"
            base = f"move to {new_value}"
            line = rng.choice([f"Big news: I moved to {new_value} {expr}!",
                               f"So {expr} I moved out of {old_value}, I live in {new_value} now.",
                               f"I'm officially living in {new_value}, the move was {expr}."])
        else:
            a = article(new_value)
            past = f"started a new job as {a} {new_value}"
            base = f"start a new job as {a} {new_value}"
            line = rng.choice([f"I started a new job {expr}, I'm {a} {new_value} now!",
                               f"{_cap(expr)} was my first day as {a} {new_value}.",
                               f"I'm not {article(old_value)} {old_value} anymore: {expr} I started as {a} {new_value}."])
        event = self._event_fact(p, past, base, when)
        return _Beat([(p, line, True), self._reaction(p, change=True)],
                     [CoreIntent(fact.key, fact.text, old_line, attr="value"),
                      EntryIntent(event.key, MemoryKind.EPISODIC, event.text, when.isoformat())],
                     [(fact, "value"), (event, "date")])

    def _semantic_change(self, fact: Fact, attr: str, update: dict, line: str, refine: bool = False,
                         event: Fact | None = None) -> _Beat:
        """UPDATE of a semantic entry; `refine` adds a detail (not a knowledge update); `event` is a
        dated event the change comes with (a car bought on a day)."""
        old_text = fact.text
        fact.attrs.update(update)
        fact.touch(attr, self.i, changed=not refine)
        intents = [EntryIntent(fact.key, MemoryKind.SEMANTIC, fact.text, replaces=(old_text,), attr=attr)]
        touched = [(fact, attr)]
        if event is not None:
            intents.append(EntryIntent(event.key, MemoryKind.EPISODIC, event.text, event.attrs["date"].isoformat()))
            touched.append((event, "date"))
        return _Beat([(fact.owner, line, True), self._reaction(fact.owner, change=not refine)], intents, touched)

    def _change_pet(self, fact: Fact) -> _Beat:
        rng, a = self.rng, fact.attrs
        if not a.get("treat") or rng.random() < 0.5:
            treat = rng.choice([t for t in V.PET_TREATS if t != a.get("treat")])
            refine = not a.get("treat")
            line = rng.choice([f"{a['name']} goes crazy for {treat}, it's the only treat that works.",
                               f"I found out my {a['species']} loves {treat}, so that's the treat now."])
            return self._semantic_change(fact, "treat", {"treat": treat}, line, refine=refine)
        new = rng.choice([n for n in V.PET_NAMES if n != a["name"]])
        line = rng.choice([f"Funny story: we renamed our {a['species']}. {a['name']} just didn't fit, so now it's {new}.",
                           f"My {a['species']} has a new name, it's {new} now instead of {a['name']}."])
        return self._semantic_change(fact, "name", {"name": new}, line)

    def _change_sibling(self, fact: Fact) -> _Beat:
        rng, a = self.rng, fact.attrs
        rel, name, subj = a["relation"], a["name"], PRONOUNS[a["relation"]][0]
        if not a.get("job") or rng.random() < 0.4:
            job = rng.choice([j for j in V.JOBS if j != a.get("job")])
            art = article(job)
            if not a.get("job"):
                line = rng.choice([f"My {rel} {name} is {art} {job}, by the way.",
                                   f"Did you know my {rel} {name} works as {art} {job}?"])
                return self._semantic_change(fact, "job", {"job": job}, line, refine=True)
            line = f"My {rel} {name} switched careers, {name} works as {art} {job} now."
            return self._semantic_change(fact, "job", {"job": job}, line)
        city = rng.choice([c for c in V.CITIES if c != a["city"]])
        line = rng.choice([f"My {rel} {name} moved from {a['city']} to {city}.",
                           f"{name} just moved to {city}, so my {rel} is in a new place again."])
        return self._semantic_change(fact, "city", {"city": city}, line)

    def _change_car(self, fact: Fact) -> _Beat | None:
        rng, p = self.rng, fact.owner
        colour, model = rng.choice(V.CAR_COLOURS), rng.choice([m for m in V.CAR_MODELS if m != fact.attrs["model"]])
        expr = past_expression(rng)
        when = resolve_relative(expr, self.today)
        if when in self.used_dates[p]:
            self.touched_keys.discard(fact.key)
            return None
        event = self._event_fact(p, f"bought a {colour} {model}", f"buy a {colour} {model}", when)
        line = rng.choice([f"I bought a new car {expr}: a {colour} {model}!",
                           f"{_cap(expr)} I finally replaced my old car, I got a {colour} {model}."])
        return self._semantic_change(fact, "car", {"colour": colour, "model": model}, line, event=event)

    def _change_cafe(self, fact: Fact) -> _Beat:
        rng, a = self.rng, fact.attrs
        if not a.get("specialty") and rng.random() < 0.5:
            spec = rng.choice(V.CAFE_SPECIALTIES)
            line = rng.choice([f"{a['name']} is famous for its {spec}, you have to try them sometime.",
                               f"Honestly, I keep going back to {a['name']} for the {spec}."])
            return self._semantic_change(fact, "specialty", {"specialty": spec}, line, refine=True)
        name = rng.choice([c for c in V.CAFE_NAMES if c != a["name"]])
        street = rng.choice(V.STREETS)
        line = rng.choice([f"I have a new favourite café: {name} on {street}.",
                           f"I've stopped going to {a['name']}, {name} on {street} is my favourite café now."])
        fact.sessions.pop("specialty", None)  # a new café: what was said about the old one is moot
        return self._semantic_change(fact, "cafe", {"name": name, "street": street, "specialty": None}, line)

    def _change_plan(self, fact: Fact) -> _Beat:
        rng, a = self.rng, fact.attrs
        old_text = fact.text
        new_date = a["date"] + timedelta(days=7)
        a["date"] = new_date
        self.used_dates[fact.owner].add(new_date)
        fact.touch("date", self.i, changed=True)
        line = rng.choice([f"Remember I was going to {a['base']}? It got pushed back a week.",
                           f"Change of plans: I'll {a['base']} a week later than planned."])
        return _Beat([(fact.owner, line, True), (self.other[fact.owner], "Oh well, something to look forward to.", False)],
                     [EntryIntent(fact.key, MemoryKind.EPISODIC, fact.text, new_date.isoformat(), (old_text,),
                                  attr="date")],
                     [(fact, "date")])

    def _change_procedure(self, fact: Fact) -> _Beat:
        a = fact.attrs
        k, new_step, said = V.PROCEDURES[a["index"]][3]
        old_text = fact.text
        steps = list(a["steps"])
        steps[k] = new_step
        a.update(steps=tuple(steps), ask=k, revised=True)
        fact.touch(f"step{k}", self.i, changed=True)
        title = f"{a['name']} recipe" if a["category"] == "recipe" else a["name"]
        line = f"I changed my {title} a bit: {said}."
        return _Beat([(fact.owner, line, True), self._reaction(fact.owner)],
                     [EntryIntent(fact.key, MemoryKind.PROCEDURAL, fact.text, replaces=(old_text,), attr=f"step{k}")],
                     [(fact, f"step{k}")])

    # --- the occasion mentioned twice and merged ---------------------------------------------------

    def _shared(self) -> _Beat | None:
        rng = self.rng
        if self.shared is None:  # stage 1: the guest mentions going to an occasion on a date
            guest = rng.choice(self.people)
            when = self.today + timedelta(days=rng.randrange(40, 80))
            if when in self.used_dates[guest]:
                return None
            self.used_dates[guest].add(when)
            occasion = rng.choice(V.OCCASIONS)
            host_side = self.other[guest]
            relation = "cousin"  # never "sister" / "brother": those name the sibling fact
            self.shared = {"guest": guest, "host_side": host_side, "date": when, "occasion": occasion,
                           "relation": relation, "host": rng.choice(V.RELATIVE_NAMES[relation]), "stage": 1,
                           "a": f"shared_a:{self.cid}", "b": f"shared_b:{self.cid}"}
            fact = self._new_fact(self.shared["a"], "shared_a", MemoryKind.EPISODIC, guest,
                                  {"occasion": occasion, "date": when}, ("date",))
            said = f"{when.strftime('%B')} {when.day}"
            line = rng.choice([f"I'm going to {article(occasion)} {occasion} on {said}, an old friend of mine is celebrating.",
                               f"I've been invited to {article(occasion)} {occasion} on {said}!"])
            return _Beat([(guest, line, True), self._reaction(guest)],
                         [EntryIntent(fact.key, MemoryKind.EPISODIC, fact.text, when.isoformat())], [(fact, "date")])
        s = self.shared
        if s["date"] <= self.today + timedelta(days=1):  # the occasion came before the link: no merge
            self.shared_done = True
            return None
        if s["stage"] == 1:  # stage 2: the other speaker mentions a relative's occasion on that date
            side = s["host_side"]
            if self.facts[s["a"]].intro == self.i:
                return None
            if s["date"] in self.used_dates[side]:
                self.shared_done = True
                return None
            self.used_dates[side].add(s["date"])
            fact = self._new_fact(s["b"], "shared_b", MemoryKind.EPISODIC, side,
                                  {"occasion": s["occasion"], "date": s["date"], "relation": s["relation"],
                                   "host": s["host"]}, ("date",))
            said = f"{s['date'].strftime('%B')} {s['date'].day}"
            line = (f"My {s['relation']} {s['host']} is having {article(s['occasion'])} {s['occasion']} on {said}, "
                    "I'm helping with the preparations.")
            s["stage"] = 2
            return _Beat([(side, line, True), self._reaction(side)],
                         [EntryIntent(fact.key, MemoryKind.EPISODIC, fact.text, s["date"].isoformat())],
                         [(fact, "date")])
        a_fact, b_fact = self.facts[s["a"]], self.facts[s["b"]]
        if not (self._free(a_fact.key) and self._free(b_fact.key)):
            return None
        # stage 3: they find out it is the same occasion; the two entries become one
        del self.facts[s["a"]], self.facts[s["b"]]
        side = s["host_side"]
        fact = self._new_fact(f"shared:{self.cid}", "shared", MemoryKind.EPISODIC, side,
                              {"occasion": s["occasion"], "date": s["date"], "relation": s["relation"],
                               "host": s["host"], "guest": s["guest"]}, ("host",))
        for old in (a_fact, b_fact):
            for sess in old.sessions.get("date", ()):
                fact.touch("host", sess, changed=False)
            fact.turns.setdefault("host", []).extend(old.turns.get("date", ()))
        self.shared_done = True
        line = (f"Wait, your {s['relation']} is {s['host']}? {s['host']}'s {s['occasion']} is the one I'm going to! "
                f"{s['host']} and I are old friends.")
        return _Beat([(s["guest"], line, True), (side, "No way, what a small world! See you there then.", True)],
                     [EntryIntent(fact.key, MemoryKind.EPISODIC, fact.text, s["date"].isoformat(),
                                  (a_fact.text, b_fact.text), attr="host")], [(fact, "host")])

    # --- output -------------------------------------------------------------------------------------

    def conversation(self, conversation_questions) -> WorldConversation:
        conv = Conversation(conversation_id=self.cid, speakers=self.people, sessions=tuple(self.sessions),
                            questions=tuple(q.to_question() for q in conversation_questions), dataset="world")
        profiles = {p: {k: v for k, v in prof.items() if k in CORE_ATTRS} for p, prof in self.profile.items()}
        return WorldConversation(conversation=conv, plans=tuple(self.plans), qa=tuple(conversation_questions),
                                 profiles=profiles)


def generate_conversation(seed: int, index: int, sessions: int) -> WorldConversation:
    """Conversation `index` of the world of `seed`, with `sessions` sessions."""
    _check_int("seed", seed, 0, MAX_SEED)
    _check_int("index", index, 0, MAX_SEED)
    _check_int("sessions", sessions, 1, 10**6)
    sim = _Simulation(seed, index)
    sim.run(sessions)
    return sim.conversation(sim.qa.conversation_questions())


def generate_world(seed: int, *, conversations: int = 10, sessions: int = 20) -> World:
    """A world of `conversations` conversations of `sessions` sessions each, reproducible from `seed`."""
    _check_int("conversations", conversations, 1, 10**6)
    return World(seed=seed, conversations=tuple(generate_conversation(seed, k, sessions)
                                                for k in range(conversations)))


def _check_int(name: str, value, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")
