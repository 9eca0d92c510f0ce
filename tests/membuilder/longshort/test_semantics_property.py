"""Property tests: ADD / UPDATE / DELETE / NOOP through the parser and the bank against a dict model."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from membuilder.bank import MemoryBank
from membuilder.longshort.builder import apply_longshort
from membuilder.longshort.schema import parse_decisions
from membuilder.store import InMemoryStore

TEXT = st.text(alphabet="abcdefgh ", min_size=1, max_size=12).filter(lambda s: s.strip())
# one session: per fact (action, which active id it targets (index, modulo), new text)
SESSION = st.lists(st.tuples(st.sampled_from(["ADD", "UPDATE", "DELETE", "NOOP"]), st.integers(0, 20), TEXT),
                   max_size=5)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sessions=st.lists(SESSION, max_size=5), stale=st.booleans())
def test_decisions_match_a_dict_model(sessions, stale):
    bank = MemoryBank(InMemoryStore(), "p")
    model: dict[str, str] = {}  # active id -> text
    next_id = 1
    retired: list[str] = []
    for n, session in enumerate(sessions):
        decisions, targeted = [], set()
        for i, (action, pick, text) in enumerate(session):
            free = [x for x in sorted(model) if x not in targeted]
            if action in ("UPDATE", "DELETE") and not free:
                action = "ADD"  # nothing left to target: the model's only legal choice
            d = {"fact": i, "action": action}
            if action in ("UPDATE", "DELETE"):
                d["id"] = free[pick % len(free)]
                targeted.add(d["id"])
            if action in ("ADD", "UPDATE"):
                d["memory"] = text
            decisions.append(d)
        # every active id is shown with every fact: the parser must accept exactly these decisions
        shown = tuple(tuple(sorted(model)) for _ in decisions)
        parsed = parse_decisions(json.dumps({"decisions": decisions}), shown)
        assert parsed.ok, parsed.error
        # the dict model, in fact order
        for d in decisions:
            if d["action"] == "ADD":
                model[f"S{next_id}"] = d["memory"].strip()
                next_id += 1
            elif d["action"] == "UPDATE":
                model[d["id"]] = d["memory"].strip()
            elif d["action"] == "DELETE":
                del model[d["id"]]
                retired.append(d["id"])
        result, lt_rej, _ = apply_longshort(bank, parsed.value, None, session_id=f"s{n}", when=None)
        assert lt_rej == []
        assert {e.id: e.text for e in bank.entries()} == model
        assert set(result.retired) == {d["id"] for d in decisions if d["action"] == "DELETE"}
    if stale and retired:
        # acting on a retired id: the bank refuses that part, applies the rest, and says why
        before = {e.id: e.text for e in bank.entries()}
        from membuilder.longshort.schema import Decision

        result, lt_rej, _ = apply_longshort(bank, (Decision(0, "DELETE", None, retired[0]),
                                                   Decision(1, "ADD", "fresh")), None, session_id="x", when=None)
        assert len(lt_rej) == 1 and "retired" in lt_rej[0]
        assert {e.id: e.text for e in bank.entries()} == {**before, f"S{next_id}": "fresh"}
