"""Random operation sequences against a plain-Python model of the semantics (DESIGN section 1).

The model below is written independently of `MemoryBank`: dicts and lists, rules spelled out one
by one. Hypothesis drives both with valid and invalid batches across kinds and owners, with
snapshots and restores (also across owners), and checks after every step that they agree, that a
rejected batch left the bank's snapshot unchanged, and that search only returns the owner's
active entries of the asked kinds.
"""

import copy

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from membuilder.bank import MemoryBank
from membuilder.operations import Add, CoreAppend, CoreReplace, CoreRewrite, Merge, Skip, Update
from membuilder.store import InMemoryStore, SQLiteStore
from membuilder.types import MemoryKind, OperationRejected, Status

from .conftest import FakeClock

OWNERS = ["ann", "bob"]
KINDS = [MemoryKind.EPISODIC, MemoryKind.SEMANTIC, MemoryKind.PROCEDURAL]
PREFIX = {MemoryKind.EPISODIC: "E", MemoryKind.SEMANTIC: "S", MemoryKind.PROCEDURAL: "P"}
ALLOWED = {
    MemoryKind.EPISODIC: {"ADD", "UPDATE", "MERGE"},
    MemoryKind.SEMANTIC: {"ADD", "UPDATE", "SKIP"},
    MemoryKind.PROCEDURAL: {"ADD", "UPDATE"},
}
CORE_LIMIT = 40  # small, so the limit is reached often

words = st.sampled_from(["tea", "paris", "dog", "piano", "run", "cake", "blue", "max"])
texts = st.lists(words, min_size=1, max_size=4).map(" ".join)
dates = st.one_of(st.none(), st.sampled_from(["2023-01-05", "2023-03-01", "2023-07-19"]))
ids = st.one_of(
    st.builds(lambda p, n: f"{p}{n}", st.sampled_from("ESP"), st.integers(1, 12)),
    st.just("nope"),
)


class Model:
    """Per owner: core text, id counter, and entries {id: dict}. Returns None or raises Reject."""

    class Reject(Exception):
        pass

    def __init__(self):
        self.owners = {o: {"core": "", "next": 1, "entries": {}} for o in OWNERS}

    def apply(self, owner, ops):
        st_ = copy.deepcopy(self.owners[owner])
        for op in ops:
            self._one(st_, op)
        self.owners[owner] = st_

    def _live(self, st_, i, kind):
        e = st_["entries"].get(i)
        if e is None or e["kind"] != kind or e["status"] != "active":
            raise Model.Reject(i)
        return e

    def _one(self, s, op):
        if isinstance(op, (CoreAppend, CoreReplace, CoreRewrite)):
            if isinstance(op, CoreAppend):
                new = (s["core"] + "\n" + op.content) if s["core"] else op.content
            elif isinstance(op, CoreRewrite):
                new = op.content
            else:
                if op.old_text not in s["core"]:
                    raise Model.Reject("replace")
                i = s["core"].index(op.old_text)
                new = s["core"][:i] + op.new_text + s["core"][i + len(op.old_text):]
            if len(new) > CORE_LIMIT:
                raise Model.Reject("limit")
            s["core"] = new
            return
        if op.action not in ALLOWED[op.kind]:
            raise Model.Reject("action")
        if isinstance(op, Skip):
            return
        if isinstance(op, Add):
            new_id = f"{PREFIX[op.kind]}{s['next']}"
            s["next"] += 1
            s["entries"][new_id] = dict(kind=op.kind, text=op.memory, status="active", time=op.time, sources=())
        elif isinstance(op, Update):
            e = self._live(s, op.id, op.kind)
            e["text"] = op.new_memory
            e["time"] = op.time or e["time"]
        elif isinstance(op, Merge):
            sources = [self._live(s, i, op.kind) for i in op.ids]
            times = sorted(x["time"] for x in sources if x["time"])
            new_id = f"{PREFIX[op.kind]}{s['next']}"
            s["next"] += 1
            for x in sources:
                x["status"] = "retired"
            s["entries"][new_id] = dict(
                kind=op.kind, text=op.new_memory, status="active", time=op.time or (times[0] if times else None),
                sources=tuple(op.ids),
            )


def operation(kind_strategy=st.sampled_from(KINDS)):
    entry_op = st.one_of(
        st.builds(Add, kind_strategy, texts, dates),
        st.builds(Update, kind_strategy, ids, texts, dates),
        st.builds(Merge, kind_strategy, st.lists(ids, min_size=2, max_size=3, unique=True), texts),
        st.builds(Skip, kind_strategy, st.just("no news")),
    )
    core_op = st.one_of(
        st.builds(CoreAppend, texts),
        st.builds(CoreReplace, words, texts),
        st.builds(CoreRewrite, texts),
    )
    return st.one_of(entry_op, entry_op, core_op)


operations = st.lists(operation(), max_size=4)


class BankMachine(RuleBasedStateMachine):
    make_store = staticmethod(InMemoryStore)
    snapshots = Bundle("snapshots")

    def __init__(self):
        super().__init__()
        self.store = self.make_store()
        clock = FakeClock()
        self.banks = {o: MemoryBank(self.store, o, clock=clock, core_limit=CORE_LIMIT) for o in OWNERS}
        self.model = Model()

    def teardown(self):
        self.store.close()

    @rule(owner=st.sampled_from(OWNERS), ops=operations)
    def apply_batch(self, owner, ops):
        bank = self.banks[owner]
        before = bank.snapshot()
        other = self.banks[OWNERS[1 - OWNERS.index(owner)]].snapshot()
        try:
            self.model.apply(owner, ops)
            expected_ok = True
        except Model.Reject:
            expected_ok = False
        try:
            bank.apply(ops)
            ok = True
        except OperationRejected:
            ok = False
        assert ok == expected_ok, (ops, ok)
        if not ok:
            assert bank.snapshot() == before  # a rejected batch changes nothing at all
        assert self.banks[OWNERS[1 - OWNERS.index(owner)]].snapshot() == other  # owner isolation

    @rule(owner=st.sampled_from(OWNERS), ops=operations)
    def apply_skipping_invalid(self, owner, ops):
        trial = copy.deepcopy(self.model)
        valid = []
        for op in ops:  # the model keeps the operations that are valid in sequence
            try:
                trial.apply(owner, [op])
                valid.append(op)
            except Model.Reject:
                pass
        self.model = trial
        result = self.banks[owner].apply(ops, skip_invalid=True)
        assert len(result.rejected) == len(ops) - len(valid)

    @rule(target=snapshots, owner=st.sampled_from(OWNERS))
    def take_snapshot(self, owner):
        return self.banks[owner].snapshot(), copy.deepcopy(self.model.owners[owner])

    @rule(snap=snapshots, owner=st.sampled_from(OWNERS))
    def restore(self, snap, owner):
        state, model_state = snap
        self.banks[owner].restore(state)
        self.model.owners[owner] = copy.deepcopy(model_state)
        if state.owner == owner:
            assert self.banks[owner].snapshot() == state

    @rule(snap=consumes(snapshots))
    def forget_snapshot(self, snap):
        pass

    @rule(owner=st.sampled_from(OWNERS), query=texts, kinds=st.lists(st.sampled_from(KINDS), unique=True))
    def search(self, owner, query, kinds):
        hits = self.banks[owner].search(query, k=50, kinds=kinds or None)
        live = {
            i for i, e in self.model.owners[owner]["entries"].items()
            if e["status"] == "active" and (not kinds or e["kind"] in kinds)
        }
        assert {h.entry.id for h in hits} <= live
        query_words = set(query.split())
        # every live entry sharing a word with the query is found (BM25 score > 0)
        # unless the word is in every document (then Okapi idf is tiny but still positive)
        matching = {
            i for i in live if query_words & set(self.model.owners[owner]["entries"][i]["text"].split())
        }
        assert matching <= {h.entry.id for h in hits}

    @invariant()
    def agrees_with_model(self):
        for owner, bank in self.banks.items():
            m = self.model.owners[owner]
            assert bank.core == m["core"]
            got = {
                e.id: dict(
                    kind=e.kind, text=e.text, status=e.status.value, time=e.event_time, sources=e.merged_from
                )
                for e in bank.entries(include_retired=True)
            }
            assert got == m["entries"]
            assert all(e.owner == owner for e in bank.entries(include_retired=True))


BankMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestInMemoryBank = BankMachine.TestCase


class SQLiteBankMachine(BankMachine):
    def __init__(self):
        import tempfile

        self._tmp = tempfile.TemporaryDirectory()
        self.make_store = lambda: SQLiteStore(f"{self._tmp.name}/bank.sqlite")
        super().__init__()

    def teardown(self):
        super().teardown()
        self._tmp.cleanup()


SQLiteBankMachine.TestCase.settings = settings(
    max_examples=25, stateful_step_count=20, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestSQLiteBank = SQLiteBankMachine.TestCase


def test_model_is_not_trivially_permissive():
    """The model itself rejects what the semantics reject (guards against a vacuous agreement)."""
    m = Model()
    m.apply("ann", [Add(MemoryKind.EPISODIC, "a"), Add(MemoryKind.EPISODIC, "b")])
    for bad in (
        Update(MemoryKind.SEMANTIC, "E1", "x"),
        Update(MemoryKind.EPISODIC, "E9", "x"),
        CoreReplace("zzz", "y"),
        CoreAppend("x" * (CORE_LIMIT + 1)),
    ):
        try:
            m.apply("ann", [bad])
            raise AssertionError(f"model accepted {bad}")
        except Model.Reject:
            pass
    m.apply("ann", [Merge(MemoryKind.EPISODIC, ("E1", "E2"), "ab")])
    assert m.owners["ann"]["entries"]["E1"]["status"] == "retired"
    assert Status.RETIRED.value == "retired"
