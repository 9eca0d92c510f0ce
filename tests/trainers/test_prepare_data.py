"""trainers/prepare_data.py and trainers/data/: trajectories, resume, session QA, the SFT and RL sets,
the LongMemEval leakage guard, and the pipeline end to end into trainers/sft.py."""

from __future__ import annotations

import gzip
import json
from datetime import datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from membuilder.agents.records import read_records
from membuilder.datasets import (
    Conversation,
    Message,
    Question,
    Session,
    SplitLeakageError,
    default_data_dir,
    longmemeval_base_id,
)
from membuilder.llm import ChatResult, LLMRequestError, TokenUsage
from membuilder.snapshots import SnapshotStore
from membuilder.store import InMemoryStore
from membuilder.bank import MemoryBank
from membuilder.operations import Add
from membuilder.types import MemoryKind
from reward.types import QAPair
from trainers.data.rl_rows import read_rl_rows
from trainers.data.rl_set import assign_splits, guard_longmemeval
from trainers.data.session_qa import LLMQAGenerator, evidence_qa, mix_counts, parse_generated, pick_mix
from trainers.data.sft_set import gate, shorten_pair, pair_tokens
from trainers.data.trajectories import RECORDS, conversation_folder
from membuilder.world import DEFAULT_CONVERSATIONS, DEFAULT_SESSIONS, generate_world
from trainers.prepare_data import PrepareError, PrepareSettings, main, prepare, prepare_world
from trainers.sft_data import SFTPair, read_pairs
from trainers.tiny import train_tokenizer

LOCOMO = default_data_dir() / "locomo" / "locomo10.json"
needs_locomo = pytest.mark.skipif(not LOCOMO.is_file(), reason="LoCoMo not in the shared data folder")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


def _session(sid: str, n_turns: int, day: int, prefix: str) -> Session:
    msgs = tuple(Message(speaker="Ann" if k % 2 == 0 else "Bob", role="user" if k % 2 == 0 else "assistant",
                         text=f"turn {k} of {sid} about topic {k}", turn_id=f"{prefix}:{k + 1}")
                 for k in range(n_turns))
    return Session(session_id=sid, date=datetime(2023, 5, day, 10, 0), date_text=None, messages=msgs)


def _q(qid: str, category: str, sessions: tuple[str, ...], answer: str = "x", abstention: bool = False) -> Question:
    return Question(question_id=qid, question=f"question {qid}?", answer=answer, category=category,
                    evidence=(), question_date=None, is_abstention=abstention, evidence_sessions=sessions)


# ---------------------------------------------------------------------------------------------
# Session QA
# ---------------------------------------------------------------------------------------------


def test_evidence_qa_goes_to_the_last_evidence_session_with_its_type():
    sessions = tuple(_session(f"session_{i}", 2, i, f"D{i}") for i in (1, 2, 3))
    conv = Conversation("c", ("Ann", "Bob"), sessions, (
        _q("q0", "single-hop", ("session_1",)),
        _q("q1", "multi-hop", ("session_1", "session_2")),   # spans 2 sessions -> cross, at session_2
        _q("q2", "temporal", ("session_2",)),
        _q("q3", "adversarial", ("session_2",), answer="Not answerable", abstention=True),
        _q("q4", "open-domain", ()),                          # no evidence: nowhere
        _q("q5", "single-hop", ("session_3",)),               # past the 2 selected sessions: nowhere
    ), dataset="locomo")
    qa = evidence_qa(conv, sessions[:2])
    assert [x.session_id for x in qa] == ["session_1", "session_2"]
    assert [(q.question_id, q.qtype) for q in qa[0].qa] == [("q0", "single-session")]
    assert [(q.question_id, q.qtype) for q in qa[1].qa] == [
        ("q1", "cross-session"), ("q2", "temporal"), ("q3", "abstention")]
    # LoCoMo has no question dates: the session's date is used; the source names the dataset.
    assert qa[1].qa[0].question_date == "2023-05-02T10:00:00" and qa[1].qa[0].source == "locomo-evidence"
    assert qa[0].reason is None


def test_a_session_without_evidence_gets_no_qa_and_a_reason():
    sessions = (_session("s1", 2, 1, "D1"),)
    (only,) = evidence_qa(Conversation("c", ("Ann", "Bob"), sessions, (), dataset="locomo"), sessions)
    assert only.qa == () and "no dataset question" in only.reason


def test_pick_mix_takes_the_design_mix_first():
    def q(i, t):
        return QAPair(question=f"q{i}?", answer="a", qtype=t)

    cands = [q(0, "temporal"), q(1, "temporal"), q(2, "single-session"), q(3, "single-session"),
             q(4, "single-session"), q(5, "cross-session"), q(6, "abstention")]
    # MIX_ORDER: single (q2), cross (q5), temporal (q0), single (q3), cross (none left) -> 4 chosen,
    # then the rest in order fills the fifth: q1. Returned in candidate order.
    assert [x.question for x in pick_mix(cands, 5)] == ["q0?", "q1?", "q2?", "q3?", "q5?"]
    assert [x.question for x in pick_mix(cands, 2)] == ["q2?", "q5?"]


def test_mix_counts():
    # 5: temporal round(5/5) = 1, cross round(5/3) = 2, single 5 - 1 - 2 = 2
    assert mix_counts(5, True) == {"single-session": 2, "cross-session": 2, "temporal": 1}
    assert mix_counts(5, False) == {"single-session": 4, "cross-session": 0, "temporal": 1}


class FakeClient:
    """Replies from a list, one per call; an Exception in the list is raised."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.calls = []

    def chat(self, messages, **kw):
        self.calls.append((messages, kw))
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return ChatResult(text=reply, finish_reason="stop", usage=TokenUsage(), response_id=None, cached=False,
                          model="fake")


def _qa_json(types):
    return json.dumps({"qa": [{"question": f"Q{i}?", "answer": f"A{i}", "type": t} for i, t in enumerate(types)]})


def test_llm_qa_generator_parses_strictly_and_retries_a_bounded_number_of_times():
    session = _session("s1", 4, 3, "D1")
    good = _qa_json(["single-session"] * 4 + ["temporal"])
    # no memory before: no cross-session asked for; a cross-session answer is refused
    bad = _qa_json(["single-session"] * 3 + ["cross-session", "temporal"])
    client = FakeClient([LLMRequestError("boom", status_code=500), bad, good])
    gen = LLMQAGenerator(client, model="m", max_attempts=3)
    out = gen.session_qa(session, 0, None)
    assert [q.answer for q in out.qa] == ["A0", "A1", "A2", "A3", "A4"]
    assert out.qa[4].qtype == "temporal" and out.qa[0].source == "llm:m"
    assert out.qa[0].question_date == "2023-05-03T10:00:00"
    # the first call may come from the cache, retries may not
    assert [kw["use_cache"] for _, kw in client.calls] == [True, False, False]

    failing = LLMQAGenerator(FakeClient(["not json", bad]), model="m", max_attempts=2)
    out = failing.session_qa(session, 0, None)
    assert out.qa == () and "after 2 attempt(s)" in out.reason and "cross-session" in out.reason


def test_parse_generated_refuses_wrong_counts_and_fields():
    counts = {"single-session": 2, "cross-session": 2, "temporal": 1}
    assert parse_generated(_qa_json(["single-session"] * 2 + ["cross-session"] * 2 + ["temporal"]), counts)[0]
    assert parse_generated(_qa_json(["single-session"] * 4), counts)[0] is None  # 4 items, not 5
    # per-type counts may be off by one: 0 temporal and 3 cross-session pass, 4 cross-session do not
    assert parse_generated(_qa_json(["single-session"] * 2 + ["cross-session"] * 3), counts)[0]
    assert "4 cross-session" in parse_generated(_qa_json(["single-session"] + ["cross-session"] * 4), counts)[1]
    extra = json.dumps({"qa": [{"question": "q", "answer": "a", "type": "temporal", "why": "x"}] * 5})
    assert "exactly" in parse_generated(extra, counts)[1]


# ---------------------------------------------------------------------------------------------
# Validity gate and overlong pairs
# ---------------------------------------------------------------------------------------------


def test_gate_is_the_reward_validity_verdict_against_the_state_before():
    bank = MemoryBank(InMemoryStore(), "o", clock=lambda: 0.0)
    bank.apply([Add(MemoryKind.SEMANTIC, "Ann likes tea")])
    state = bank.snapshot()
    assert gate("semantic", '{"operations": [{"action": "UPDATE", "id": "S1", "new_memory": "Ann likes coffee"}]}',
                state) is None
    assert "S9" in gate("semantic", '{"operations": [{"action": "UPDATE", "id": "S9", "new_memory": "x"}]}', state)
    # the core limit: an APPEND of 5,001 characters to an empty block is over 5,000
    assert "limit" in gate("core", json.dumps({"action": "APPEND", "content": "x" * 5001}), state)
    assert gate("core", json.dumps({"action": "APPEND", "content": "x" * 5000}), state) is None
    assert gate("core", "no json here", state) is not None


def test_shorten_pair_cuts_the_session_in_the_middle_and_keeps_instructions(tokenizer):
    session = _session("s1", 40, 1, "D1")
    transcript = "\n".join(f"[{m.turn_id}] {m.speaker}: {m.text}" for m in session.messages)
    system = "You maintain the EPISODIC memory. Schema: {\"operations\": [...]}"
    user = f"Session date: 2023-05-01\n\nNew session (40 turns):\n{transcript}\n\nAnswer with one JSON object."
    pair = SFTPair(({"role": "system", "content": system}, {"role": "user", "content": user}), '{"operations": []}')
    full = pair_tokens(tokenizer, pair)
    limit = full - 100
    short = shorten_pair(tokenizer, pair, session, limit)
    assert pair_tokens(tokenizer, short) <= limit
    assert short.messages[0] == pair.messages[0] and short.target == pair.target
    text = short.messages[1]["content"]
    assert text.startswith("Session date: 2023-05-01\n\nNew session (40 turns):\n[D1:1] Ann: turn 0")
    assert text.endswith("[D1:40] Bob: turn 39 of s1 about topic 39\n\nAnswer with one JSON object.")
    kept = [m.turn_id for m in session.messages if f"[{m.turn_id}] " in text]
    left_out = 40 - len(kept)
    # half the kept turns from the start, the rest from the end, and a marker naming the gap
    head = (len(kept) + 1) // 2
    assert kept == [f"D1:{k}" for k in range(1, head + 1)] + [f"D1:{k}" for k in range(head + left_out + 1, 41)]
    assert f"[... {left_out} turns (D1:{head + 1} to D1:{head + left_out}) are left out here" in text
    # one more turn would not fit (the most turns that fit are kept)
    assert 0 < left_out < 40
    assert shorten_pair(tokenizer, pair, session, 10) is None  # not even the instructions fit


# ---------------------------------------------------------------------------------------------
# Splits and the LongMemEval guard
# ---------------------------------------------------------------------------------------------


def test_assign_splits_keeps_twins_together_and_is_stable():
    ids = ["a", "a_abs", "b", "c", "d"]
    sides = assign_splits(ids, 0.5, seed=0, group=longmemeval_base_id)
    assert sides["a"] == sides["a_abs"]
    # 4 groups, ceil(0.5 * 4) = 2 held out
    assert len({longmemeval_base_id(i) for i, s in sides.items() if s == "heldout"}) == 2
    more = assign_splits(ids + ["e", "f", "g", "h"], 0.5, seed=0, group=longmemeval_base_id)
    assert assign_splits(["x"], 0.5) == {"x": "train"}  # a single conversation is never held out
    assert sides == assign_splits(list(reversed(ids)), 0.5, seed=0, group=longmemeval_base_id)
    assert set(more) > set(sides)


def _lme_conv(qid: str) -> Conversation:
    return Conversation(qid, ("user", "assistant"), (_session(f"{qid}-s1", 2, 1, qid),), (), dataset="longmemeval")


def test_guard_keeps_only_training_ids_and_drops_twins_of_test_ids():
    convs = [_lme_conv(i) for i in ["a", "b", "b_abs", "c", "d_abs", "d"]]
    splits = {"sft": ["a"], "rl": ["b", "d_abs", "d"]}
    result = guard_longmemeval(convs, splits, ("sft", "rl"))
    # b is a training id but its twin b_abs (not listed: a test id) shares its haystack -> out
    assert [c.conversation_id for c in result.kept] == ["a", "d_abs", "d"]
    assert set(result.excluded) == {"b", "b_abs", "c"} and "b_abs" in result.excluded["b"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcdefgh"), st.booleans(), st.sampled_from(["sft", "rl", "test"])),
                min_size=1, max_size=12))
def test_no_test_id_or_twin_of_one_ever_passes_the_guard(items):
    side_of: dict[str, str] = {}
    for base, abs_, side in items:
        side_of.setdefault(base + ("_abs" if abs_ else ""), side)
    splits = {"sft": [i for i, s in side_of.items() if s == "sft"], "rl": [i for i, s in side_of.items() if s == "rl"]}
    test_ids = {i for i, s in side_of.items() if s == "test"}
    try:
        kept = guard_longmemeval([_lme_conv(i) for i in side_of], splits, ("sft", "rl")).kept
    except SplitLeakageError:
        return  # refusing is always safe
    kept_ids = {c.conversation_id for c in kept}
    assert not kept_ids & test_ids
    assert not {longmemeval_base_id(i) for i in kept_ids} & {longmemeval_base_id(i) for i in test_ids}


def _write_lme(path: Path, ids: list[str]) -> None:
    items = []
    for k, qid in enumerate(ids):
        hay = [[{"role": "user", "content": f"I adopted a cat named Tom{k}.", "has_answer": True},
                {"role": "assistant", "content": "Congratulations!"}],
               [{"role": "user", "content": "What should I cook tonight?"},
                {"role": "assistant", "content": "Pasta."}]]
        items.append({"question_id": qid, "question_type": "single-session-user", "question": "What is my cat's name?",
                      "answer": f"Tom{k}", "question_date": "2023/05/30 (Tue) 23:40",
                      "haystack_session_ids": [f"{qid}-s1", f"{qid}-s2"],
                      "haystack_dates": ["2023/05/20 (Sat) 10:00", "2023/05/21 (Sun) 11:00"],
                      "haystack_sessions": hay, "answer_session_ids": [f"{qid}-s1"]})
    with gzip.open(path, "wt") as fh:
        json.dump(items, fh)


def test_longmemeval_prepare_uses_only_split_ids_sft_and_rl_sides_apart(tmp_path):
    data = tmp_path / "lme.json.gz"
    _write_lme(data, ["q1", "q2", "q2_abs", "q3", "q4"])
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"sft": ["q1"], "rl": ["q2", "q4"]}))
    res = prepare(PrepareSettings(dataset="longmemeval", expert="annotation", out=str(tmp_path / "out"),
                                  data=str(data), splits=str(splits), tokenizer="tiny", max_length=None,
                                  progress=False))
    m = res.manifest
    assert set(m["excluded"]) == {"q2", "q2_abs", "q3"}
    assert m["sft_conversations"] == ["q1"] and m["rl_conversations"] == ["q4"]
    rl = read_rl_rows(res.rl)
    assert {r.conversation_id for r in rl.rows} == {"q4"}
    # q4's evidence is its first session: 1 QA there (single-session, LongMemEval's date), none in the second
    qa = {r.session_id: r.qa for r in rl.rows}
    assert [q.answer for q in qa["q4-s1"]] == ["Tom4"] and qa["q4-s1"][0].question_date == "2023-05-30T23:40:00"
    # q1 and q4 were built; each has its question at s1, so q1-s2 and q4-s2 have none
    assert qa["q4-s2"] == () and m["counts"]["sessions_without_qa"] == 2
    # the annotation expert has nothing for LongMemEval: every target is {"operations": []};
    # only q1 (the sft side) gives pairs: 2 sessions x 4 agents
    pairs = read_pairs(res.sft)
    assert len(pairs) == 8 and {p.target for p in pairs} == {'{"operations": []}'}


# ---------------------------------------------------------------------------------------------
# LoCoMo: end to end, resume, refusals
# ---------------------------------------------------------------------------------------------


def _locomo_settings(out: Path, **kw) -> PrepareSettings:
    base = dict(dataset="locomo", expert="annotation", out=str(out), conversations=2, sessions=3, tokenizer="tiny",
                max_length=4096, progress=False, heldout_fraction=0.5)
    base.update(kw)
    return PrepareSettings(**base)


def _normalised_records(folder: Path) -> list[dict]:
    out = []
    for rec in read_records(folder / RECORDS):
        d = rec.to_dict()
        for agent in d["agents"].values():
            agent["elapsed_s"] = 0.0  # wall time: the only field that may differ between runs
        out.append(d)
    return out


class Killed(Exception):
    pass


@needs_locomo
def test_resume_after_a_kill_gives_the_same_outputs_as_an_uninterrupted_run(tmp_path):
    whole = prepare(_locomo_settings(tmp_path / "whole"))

    seen = []

    def kill_after_four(record):
        seen.append(record.session_id)
        if len(seen) == 4:  # conv 1 done (3 sessions), conv 2 has 1
            raise Killed()

    with pytest.raises(Killed):
        prepare(_locomo_settings(tmp_path / "cut"), after_session=kill_after_four)
    conv2 = tmp_path / "cut" / "trajectories" / conversation_folder("conv-30")
    with open(conv2 / RECORDS, "ab") as fh:
        fh.write(b'{"format": "membuilder.session_rec')  # a line cut short by the kill
    with pytest.raises(PrepareError, match="--resume"):
        prepare(_locomo_settings(tmp_path / "cut"))
    with pytest.raises(PrepareError, match="sessions=3"):
        prepare(_locomo_settings(tmp_path / "cut", sessions=2, resume=True))
    resumed = prepare(_locomo_settings(tmp_path / "cut", resume=True), after_session=lambda r: seen.append(r.session_id))
    # nothing repeated: the 2 sessions left were the only ones built after the kill
    assert seen == ["session_1", "session_2", "session_3", "session_1", "session_2", "session_3"]

    for conv in ("conv-26", "conv-30"):
        a, b = (r.trajectories / conversation_folder(conv) for r in (whole, resumed))
        assert _normalised_records(a) == _normalised_records(b)
        assert (a / "qa.jsonl").read_bytes() == (b / "qa.jsonl").read_bytes()
        assert (a / "done.json").read_bytes() == (b / "done.json").read_bytes()
    assert whole.sft.read_bytes() == resumed.sft.read_bytes()
    assert pq.read_table(whole.rl).equals(pq.read_table(resumed.rl))
    assert SnapshotStore(whole.snapshots).ids() == SnapshotStore(resumed.snapshots).ids()
    for key in ("counts", "sft", "rl"):
        assert whole.manifest[key] == resumed.manifest[key]


@needs_locomo
def test_locomo_rows_validate_and_match_the_trajectories(tmp_path, tokenizer):
    res = prepare(_locomo_settings(tmp_path / "out", conversations=1))
    rl = read_rl_rows(res.rl)
    records = read_records(res.trajectories / "conv-26" / RECORDS)
    store = SnapshotStore(rl.snapshots_dir)
    # 3 sessions x 4 agents
    assert len(rl.rows) == 12 and rl.tokenizer.startswith("tiny:") and rl.source == "locomo/annotation"
    for row in rl.rows:
        rec = records[row.session_index]
        agent = rec.agents[MemoryKind.parse(row.agent)]
        assert row.snapshot_id == rec.snapshot_id and row.snapshot_id in store
        assert row.owner == "conv-26" and row.split == "train"  # a single conversation is never held out
        assert list(row.prompt) == agent.messages
        assert row.expert_output == agent.raw_output  # the annotation expert writes bare JSON
        assert row.expert_tokens == len(tokenizer(row.expert_output, add_special_tokens=False)["input_ids"])
    assert records[0].snapshot_id != records[1].snapshot_id
    # the QA of session 1 are LoCoMo questions whose evidence is all in D1 (their last evidence session)
    data = json.loads(LOCOMO.read_text())[0]
    in_s1 = [q for q in data["qa"] if q["evidence"] and all(e.split(":")[0] == "D1" for e in q["evidence"])]
    qa1 = [r.qa for r in rl.rows if r.session_index == 0][0]
    assert len(qa1) == min(5, len(in_s1)) and {q.question for q in qa1} <= {q["question"] for q in in_s1}


@needs_locomo
def test_every_sft_target_passes_the_gate_and_core_targets_are_the_agents_own(tmp_path):
    res = prepare(_locomo_settings(tmp_path / "out", conversations=1, sessions=6, max_length=None))
    records = read_records(res.trajectories / "conv-26" / RECORDS)
    store = SnapshotStore(res.snapshots)
    by_prompt = {json.dumps(a.messages): (a.kind, r.snapshot_id, a.raw_output) for r in records for a in r.agents.values()}
    pairs = read_pairs(res.sft)
    assert len(pairs) == 24 - sum(res.manifest["sft"]["skipped"].values())
    for pair in pairs:
        kind, snap, own = by_prompt[json.dumps(list(pair.messages))]
        assert gate(kind, pair.target, store.get(snap)) is None
        assert pair.target == own


def test_a_compressed_core_answer_is_never_an_sft_target():
    from membuilder.agents.records import AgentRecord, CompressionRecord
    from membuilder.operations import CoreRewrite
    from trainers.data.sft_set import expert_target

    state = MemoryBank(InMemoryStore(), "o", clock=lambda: 0.0).snapshot()
    own = json.dumps({"action": "APPEND", "content": "Ann is a nurse."})
    rewrite = CoreRewrite("Ann: nurse.")
    compressed = AgentRecord(kind=MemoryKind.CORE, messages=[{"role": "user", "content": "x"}], raw_output=own,
                             operations=(rewrite,), rejected=(), error=None,
                             compression=CompressionRecord([], '{"action": "REWRITE", "content": "Ann: nurse."}',
                                                           rewrite, None, 6000))
    assert expert_target(compressed, state) == (None, "core over the limit (compressed)")
    plain = AgentRecord(kind=MemoryKind.CORE, messages=[], raw_output=f"<think>hm</think>```json\n{own}\n```",
                        operations=(), rejected=(), error=None)
    assert expert_target(plain, state) == (own, None)  # the JSON the agent wrote, without wrapping

# ---------------------------------------------------------------------------------------------
# A model expert and an LLM QA generator over HTTP
# ---------------------------------------------------------------------------------------------


class ModelServer:
    """An OpenAI-compatible chat endpoint standing in for a model: the episodic agent ADDs the
    session's first turn as an event, the other agents answer no change; the QA generator gets
    pairs of exactly the asked-for types. Counts its requests."""

    def __init__(self):
        import re
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests = 0
        lock = threading.Lock()
        server = self

        def reply(body: dict) -> str:
            system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
            if system.startswith("You write test questions"):
                counts = re.findall(r'"(single-session|cross-session|temporal)": [^(]*\((\d+) of them\)', system)
                types = [t for t, n in counts for _ in range(int(n))]
                return json.dumps({"qa": [{"question": f"What about item {i}?", "answer": f"item {i}", "type": t}
                                          for i, t in enumerate(types)]})
            if "EPISODIC memory" in system:
                first = re.search(r"\n\[[^\]]+\] ([^\n]+)", user.split("New session (")[1]).group(1)
                return json.dumps({"operations": [{"action": "ADD", "memory": first[:200]}]})
            return '{"operations": []}'

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                with lock:
                    server.requests += 1
                payload = json.dumps({
                    "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": reply(body)}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_model_expert_and_llm_qa_over_http_with_a_cached_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMBUILDER_LLM_API_KEY", "test")
    server = ModelServer()
    try:
        settings = dict(dataset="world", expert="some-model", qa="some-model", out=str(tmp_path / "m"),
                        base_url=server.url, conversations=1, sessions=2, tokenizer="tiny", max_length=None,
                        progress=False)
        res = prepare(PrepareSettings(**settings))
        # 2 sessions x (4 agents + 1 QA call)
        assert server.requests == 10
        rl = read_rl_rows(res.rl)
        episodic = [r for r in rl.rows if r.agent == "episodic"]
        assert all(json.loads(r.expert_output)["operations"][0]["action"] == "ADD" for r in episodic)
        qa = [r.qa for r in rl.rows if r.agent == "core"]
        # session 1 has nothing before it: no cross-session asked (4 single, 1 temporal); session 2: 2/2/1
        assert [q.qtype for q in qa[0]] == ["single-session"] * 4 + ["temporal"]
        assert sorted(q.qtype for q in qa[1]) == ["cross-session"] * 2 + ["single-session"] * 2 + ["temporal"]
        assert {q.source for q in qa[0] + qa[1]} == {"llm:some-model"}
        assert res.manifest["sft"]["written"] == 8 and rl.source == "world/some-model"
        # a resumed run over a finished folder asks the model nothing again
        again = prepare(PrepareSettings(**{**settings, "resume": True}))
        assert server.requests == 10 and again.sft.read_bytes() == res.sft.read_bytes()
    finally:
        server.close()


# ---------------------------------------------------------------------------------------------
# The bundled world
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_world_end_to_end_into_sft_training(tmp_path, tokenizer):
    from trainers.config import SFTConfig, load_config
    from trainers.sft import SFTTrainer

    res = prepare_world(tmp_path / "world", conversations=2, sessions=3, tokenizer="tiny", max_length=4096,
                        heldout_fraction=0.5)
    assert prepare_world(tmp_path / "world", conversations=2, sessions=3, tokenizer="tiny", max_length=4096,
                         heldout_fraction=0.5).manifest == res.manifest  # made once, then reused
    m = res.manifest
    # 2 conversations x 3 sessions x 4 agents; the world expert's answers are all valid
    assert m["counts"]["sessions"] == 6 and m["sft"] == {"written": 24, "shortened": 0, "skipped": {}}
    rl = read_rl_rows(res.rl)
    # ceil(0.5 * 2) = 1 conversation held out: 12 rows each side
    assert m["rl"]["rows"] == {"heldout": 12, "train": 12} and len(rl.rows) == 24
    world = generate_world(0, conversations=2, sessions=3)
    for row in rl.rows:
        wc = next(w for w in world if w.conversation_id == row.conversation_id)
        exact = [q for q in wc.session_qa(row.session_index)]
        assert 0 < len(row.qa) <= 5 and all(q.to_dict() in exact for q in row.qa)  # exact QA, never made up
        assert row.snapshot_id in SnapshotStore(rl.snapshots_dir)

    cfg = load_config(SFTConfig, overrides=[
        f"checkpoint.output_dir={tmp_path / 'sft'}", f"data.path={res.sft}", "data.max_length=4096",
        "train.batch_size=1", "train.max_steps=2", "logging.progress_bar=false", "logging.tensorboard=false"])
    trainer = SFTTrainer(cfg)
    result = trainer.train()
    trainer.close()
    # a fresh tiny model starts near ln(1024) ~ 6.9 nats per target token
    assert len(result.losses) == 2 and 5.0 < result.losses[0] < 8.0


def test_resume_refuses_a_folder_whose_state_cannot_be_rebuilt(tmp_path):
    import shutil

    from trainers.data.trajectories import TrajectoryError

    settings = dict(dataset="world", expert="world", out=str(tmp_path / "w"), conversations=1, sessions=3,
                    tokenizer="tiny", max_length=None, progress=False)

    def kill(record):
        raise Killed()

    with pytest.raises(Killed):
        prepare(PrepareSettings(**settings), after_session=kill)
    shutil.rmtree(tmp_path / "w" / "snapshots")  # the states the records point to are gone
    with pytest.raises(TrajectoryError, match="cannot resume"):
        prepare(PrepareSettings(**settings, resume=True))


def test_conversations_built_concurrently_give_the_same_sets(tmp_path):
    def run(name, concurrency):
        return prepare(PrepareSettings(dataset="world", expert="world", out=str(tmp_path / name), conversations=3,
                                       sessions=2, tokenizer="tiny", max_length=None, progress=False,
                                       concurrency=concurrency))

    one, three = run("one", 1), run("three", 3)
    assert one.sft.read_bytes() == three.sft.read_bytes()
    assert pq.read_table(one.rl).equals(pq.read_table(three.rl))
    assert SnapshotStore(one.snapshots).ids() == SnapshotStore(three.snapshots).ids()


@pytest.mark.slow
def test_every_sft_target_of_the_whole_bundled_world_passes_the_rl_validity_gate(tmp_path):
    from membuilder.agents.apply import apply_agent_outputs

    res = prepare_world(tmp_path / "world", tokenizer="tiny", max_length=None)
    records = {json.dumps(a.messages): (a.kind, r.snapshot_id) for folder in res.trajectories.iterdir()
               for r in read_records(folder / RECORDS) for a in r.agents.values()}
    store = SnapshotStore(res.snapshots)
    pairs = read_pairs(res.sft)
    # every session of the default world and every agent gives a pair: none failed the gate
    assert len(pairs) == 4 * res.manifest["counts"]["sessions"] == 4 * DEFAULT_CONVERSATIONS * DEFAULT_SESSIONS
    for pair in pairs:
        kind, snap = records[json.dumps(list(pair.messages))]
        bank = MemoryBank(InMemoryStore(), "gate", clock=lambda: 0.0)
        bank.restore(store.get(snap))
        verdict = apply_agent_outputs(bank, {kind: pair.target}, session_id="s", drop_invalid_agents=True)
        assert verdict.agents[kind].valid, (pair.target, verdict.agents[kind].invalid_reason)


def test_cli_refuses_a_world_expert_on_locomo(capsys, tmp_path):
    assert main(["--dataset", "locomo", "--expert", "world", "--out", str(tmp_path)]) == 2
    assert "--expert world works only with --dataset world" in capsys.readouterr().err


def test_pair_lengths_are_counted_with_the_chat_template_options_sft_will_use():
    from tests.trainers.test_sft_data import _base_model_tokenizer
    from trainers.data.sft_set import pair_tokens
    from trainers.prepare_data import parse_args
    from trainers.sft_data import SFTPair

    # ChatML with a template option that adds a line before the conversation.
    template = (
        "{%- if no_think is defined and no_think %}{{- '/no_think\\n' }}{%- endif %}"
        "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    tok = _base_model_tokenizer(template)
    pair = SFTPair(({"role": "user", "content": "hi"},), "ok")
    extra = len(tok("/no_think\n", add_special_tokens=False)["input_ids"])
    assert extra > 0
    assert pair_tokens(tok, pair, {"no_think": True}) == pair_tokens(tok, pair) + extra
    s = parse_args(["--dataset", "world", "--expert", "world", "--out", "x",
                    "--chat-template-kwargs", '{"enable_thinking": false}'])
    assert s.chat_template_kwargs == {"enable_thinking": False}
    with pytest.raises(SystemExit):
        parse_args(["--dataset", "world", "--out", "x", "--chat-template-kwargs", "[1]"])
