"""The reward server and `RemoteReward` over real HTTP on 127.0.0.1 (ephemeral ports).

The scorer here is a small deterministic `RewardFn` of our own (`toy_scorer`) that reads the
state-before from the snapshot store, so the server is tested apart from the reward library: what
matters is that the server passes each request to the scorer and each reward back unchanged, in
order, and answers everything else with a clear error.
"""

from __future__ import annotations

import dataclasses
import gzip
import http.client
import json
import math
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from membuilder import InMemoryStore, MemoryBank, parse_operations
from membuilder.snapshots import SnapshotStore
from reward.client import RemoteReward, RewardServerError
from reward.server import RewardServer, ServerLimits
from reward.types import AGENTS, QAPair, SampleReward, SessionReward, SessionRewardRequest

REPO = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token"


# ---- a deterministic scorer (stand-in for the library) -------------------------------------------

def toy_scorer(store: SnapshotStore, gate=None):
    """T(g) = fraction of QA answers found (case-insensitively) in the state-before entries or in
    candidate g's outputs; a sample is valid when its agent wrote non-blank text and then gets
    R = T, else 0; weight 4 for semantic, 1 otherwise; no QA -> every sample masked.
    `gate(request)` runs first (tests use it to block or fail one session)."""

    def score(requests):
        rewards = []
        for req in requests:
            if gate is not None:
                gate(req)
            known = " ".join(e.text.lower() for e in store.get(req.snapshot_id).entries)
            samples, task = [], []
            for g, cand in enumerate(req.outputs):
                said = known + " " + " ".join(cand.values()).lower()
                t = sum(q.answer.lower() in said for q in req.qa) / len(req.qa) if req.qa else None
                task.append(t)
                for agent in AGENTS:
                    text = cand.get(agent, "")
                    valid = bool(text.strip())
                    samples.append(SampleReward(
                        agent=agent, index=g, valid=valid, task_reward=t, length_penalty=0.0,
                        reward=None if t is None else (t if valid else 0.0),
                        weight=4.0 if agent == "semantic" else 1.0, dominant_kind="semantic",
                        retrieval_counts={"semantic": len(req.qa)}, masked=t is None,
                        mask_reason="the session has no QA" if t is None else None,
                        invalid_reason=None if valid else "empty output", output_tokens=len(text.split())))
            rewards.append(SessionReward(req.session_id, tuple(samples), tuple(task)))
        return rewards

    return score


def _state(owner, texts):
    bank = MemoryBank(InMemoryStore(), owner)
    bank.apply(parse_operations("semantic", {"operations": [{"action": "ADD", "memory": t} for t in texts]}),
               session_id="s0")
    return bank.snapshot()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = SnapshotStore(tmp_path_factory.mktemp("snapshots"))
    store.put(_state("conv-1", ["Caroline adopted a dog"]))
    store.put(_state("conv-2", ["Mel plays the violin", "Mel lives in Paris"]))
    return store


@pytest.fixture(scope="module")
def ids(store):
    return {store.get(i).owner: i for i in store.ids()}


LIMITS = ServerLimits(max_body_bytes=2**20, max_sessions=40, max_qa=8, max_group=8, max_concurrency=4,
                      max_queue=64, socket_timeout_s=60, retry_after_s=0, shutdown_grace_s=5)


@contextmanager
def serve(scorer, store, token=None, **limits):
    kw = {**LIMITS.__dict__, **limits}
    server = RewardServer(scorer, store, port=0, token=token, limits=ServerLimits(**kw)).start()
    try:
        yield server
    finally:
        server.shutdown(grace_s=0)


@pytest.fixture(scope="module")
def server(store):
    with serve(toy_scorer(store), store) as s:
        yield s


def request(snapshot_id, session_id="s1", owner="conv-1", qa=(("What pet did Caroline adopt?", "dog"),),
            outputs=({"core": "Mel lives in Boston"},)):
    return SessionRewardRequest(owner=owner, snapshot_id=snapshot_id, session_id=session_id,
                                qa=tuple(QAPair(q, a) for q, a in qa), expert_tokens={"core": 5},
                                outputs=tuple(outputs))


def post(url, body, *, token=None, path="/score"):
    """(status, headers, decoded JSON) of one POST; `body` bytes are sent as they are."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        conn.request("POST", path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), json.loads(resp.read())
    finally:
        conn.close()


def raw(url, data: bytes):
    """Send bytes as they are on a fresh connection; (status, headers, decoded JSON) of the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:  # 60 s: a hang guard only
        sock.sendall(data)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, dict(resp.getheaders()), json.loads(resp.read())


def health(url):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def wait_until(predicate, what):
    """Poll (server state changes come from other threads); a 60 s guard against a hang only."""
    done = threading.Event()
    for _ in range(6000):
        if predicate():
            return
        done.wait(0.01)
    raise AssertionError(f"never happened: {what}")


# ---- behaviour ---------------------------------------------------------------------------------

def test_health_reports_version_snapshots_and_counts(server):
    h = health(server.url)
    assert h["status"] == "ok" and h["version"] == metadata.version("membuilder") and h["snapshots"] == 2
    assert h["in_flight"] == 0 and h["queued"] == 0 and h["limits"]["max_concurrency"] == 4


def test_score_over_http_matches_the_hand_computed_rewards(server, ids):
    # State-before of conv-1 holds "Caroline adopted a dog". QA: dog (found in the state), Boston.
    # g0 says "Mel lives in Boston" (core) and "" (episodic): T = 2/2 = 1.0; core valid -> 1.0,
    #   episodic blank and semantic / procedural absent -> invalid, 0.0.
    # g1 says "Mel likes jazz" (semantic): T = 1/2 = 0.5 (only dog); semantic -> 0.5 with weight 4.
    req = request(ids["conv-1"], qa=(("What pet did Caroline adopt?", "dog"), ("Where does Mel live?", "Boston")),
                  outputs=({"core": "Mel lives in Boston", "episodic": ""}, {"semantic": "Mel likes jazz"}))
    client = pickle.loads(pickle.dumps(RemoteReward(server.url)))  # trainers may ship it to workers
    (got,) = client([req])
    assert got.session_id == "s1" and got.task_rewards == (1.0, 0.5)
    assert [(s.agent, s.index, s.valid, s.reward) for s in got.samples] == [
        ("core", 0, True, 1.0), ("episodic", 0, False, 0.0), ("semantic", 0, False, 0.0),
        ("procedural", 0, False, 0.0),
        ("core", 1, False, 0.0), ("episodic", 1, False, 0.0), ("semantic", 1, True, 0.5),
        ("procedural", 1, False, 0.0)]
    assert got.sample("semantic", 1).weight == 4.0 and got.sample("core", 0).output_tokens == 4


def test_32_concurrent_calls_are_all_answered_with_their_own_rewards(server, store, ids):
    def make(i):
        # Session i asks 1 + i % 4 questions; g0 names every answer, g1 only the first city (if any),
        # so T(g1) = 2/2, 2/3 or 2/4 (dog is in conv-1's state, violin in conv-2's).
        owner = "conv-1" if i % 2 else "conv-2"
        first = ("pet?", "dog") if owner == "conv-1" else ("instrument?", "violin")
        qa = (first,) + tuple((f"city {k}?", f"city{i}x{k}") for k in range(i % 4))
        return [request(ids[owner], session_id=f"s{i}", owner=owner, qa=qa,
                        outputs=({"core": " ".join(a for _, a in qa[1:]) or "nothing"},
                                 {"semantic": f"city{i}x0"}))]

    client = RemoteReward(server.url)
    batches = [make(i) for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(client, batches))
    reference = toy_scorer(store)
    for i, (batch, got) in enumerate(zip(batches, results)):
        assert got == reference(batch), i
        assert got[0].task_rewards == (1.0, [1.0, 1.0, 2 / 3, 0.5][i % 4]), i
    assert health(server.url)["served"] >= 32


texts = st.text(max_size=20) | st.sampled_from(["\udc80", "a\x00b", "Ünïcødé 🐕"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.lists(st.tuples(texts.filter(str.strip), texts), max_size=3),
                          st.lists(st.dictionaries(st.sampled_from(AGENTS), texts, max_size=4),
                                   min_size=1, max_size=3)),
                min_size=1, max_size=4))
def test_remote_reward_equals_the_in_process_scorer(server, store, ids, sessions):
    # Any text (lone surrogates, NULs, non-ASCII) survives the round trip, and rewards come back in
    # order, equal to what the scorer gives in-process.
    reqs = [request(ids["conv-2"], session_id=f"p{i}", owner="conv-2", qa=qa, outputs=outs)
            for i, (qa, outs) in enumerate(sessions)]
    assert RemoteReward(server.url)(reqs) == toy_scorer(store)(reqs)


def test_masked_samples_pass_through_and_no_value_is_invented(store, ids):
    # An answerer that never answers, under a per-call limit: the scorer masks the session (what
    # the library does on a timeout). The server must hand back None, not 0, with the reason.
    never = threading.Event()

    def scorer(requests):
        out = []
        for req in requests:
            answered = threading.Event()
            threading.Thread(target=lambda: (never.wait(), answered.set()), daemon=True).start()
            if not answered.wait(0.05):
                samples = tuple(SampleReward(agent=a, index=g, valid=True, task_reward=None, length_penalty=0.0,
                                             reward=None, weight=1.0, dominant_kind=None, masked=True,
                                             mask_reason="answerer timed out after 0.05 s")
                                for g in range(req.group_size) for a in AGENTS)
                out.append(SessionReward(req.session_id, samples, (None,) * req.group_size))
        return out

    try:
        with serve(scorer, store) as s:
            (got,) = RemoteReward(s.url)([request(ids["conv-1"], outputs=({"core": "x"}, {"core": "dog"}))])
    finally:
        never.set()
    assert got.task_rewards == (None, None) and len(got.samples) == 8
    assert all(x.masked and x.reward is None and x.task_reward is None for x in got.samples)
    assert {x.mask_reason for x in got.samples} == {"answerer timed out after 0.05 s"}


def test_a_corrupt_snapshot_is_a_500_naming_it(tmp_path):
    store = SnapshotStore(tmp_path)
    sid = store.put(_state("conv-9", ["Mel has a cat"]))
    path = store.path(sid)
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()).replace(b"a cat", b"a dog")))
    fresh = SnapshotStore(tmp_path)  # nothing cached: the server reads the edited file
    with serve(toy_scorer(fresh), fresh) as s:
        status, _, payload = post(s.url, {"requests": [request(sid, owner="conv-9").to_dict()]})
    assert (status, payload["error"]["type"]) == (500, "snapshot_error")
    assert sid in payload["error"]["message"] and "does not hash to its id" in payload["error"]["message"]


# ---- bad requests ---------------------------------------------------------------------------------

def _body(**changes):
    req = {"owner": "conv-1", "snapshot_id": "ID", "session_id": "s1", "qa": [{"question": "q", "answer": "a"}],
           "expert_tokens": {}, "outputs": [{"core": "x"}]}
    return {"requests": [{**req, **changes}]}


@pytest.mark.parametrize("body, status, kind, message", [
    (b'{"requests": [', 400, "invalid_request", "not valid JSON"),
    (b"\xff\xfe", 400, "invalid_request", "not valid JSON"),
    (b"[1, 2]", 400, "invalid_request", "must be a JSON object"),
    (b'{"requests": [NaN]}', 400, "invalid_request", "NaN is not JSON"),
    (b'{"requests": [], "extra": 1}', 400, "invalid_request", "unknown fields ['extra']"),
    (b'{"requests": []}', 400, "invalid_request", "non-empty list"),
    (b'{"requests": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "invalid_request", "nested too deeply"),
    (b'{"requests": ' + b"[" * 40 + b"]" * 40 + b"}", 400, "invalid_request", "nested deeper than 32"),
    (_body(snapshot_id="../x"), 400, "invalid_request", "requests[0]: a snapshot id is 64 lowercase hex"),
    (_body(snapshot_id="/etc/passwd"), 400, "invalid_request", "'/etc/passwd'"),
    (_body(snapshot_id="ab/../../" + "0" * 55), 400, "invalid_request", "'ab/../../000"),
    (_body(snapshot_id="A" * 64), 400, "invalid_request", "'" + "A" * 64 + "'"),
    (_body(snapshot_id=7), 400, "invalid_request", "requests[0].snapshot_id must be"),
    (_body(snapshot_id="f" * 64), 404, "unknown_snapshot", "requests[0].snapshot_id: no snapshot " + "f" * 64),
    (_body(qa=[{"question": "q", "answer": "a"}] * 9), 400, "invalid_request", "9 pairs, over the limit of 8"),
    (_body(outputs=[]), 400, "invalid_request", "G must lie in [1, 8]"),
    (_body(outputs=[{"core": "x"}] * 9), 400, "invalid_request", "has 9 candidates"),
    (_body(outputs=[{"planner": "x"}]), 400, "invalid_request", "unknown agent 'planner'"),
    (_body(qa=[{"question": "q", "answer": "a", "source": {"a": 1}}]), 400, "invalid_request", "qa[0].source must be a string"),
    ({"requests": [_body()["requests"][0]] * 41}, 400, "invalid_request", "41 session requests is over"),
])
def test_bad_requests_get_a_structured_error_naming_the_problem(server, ids, body, status, kind, message):
    if isinstance(body, dict):
        body = json.loads(json.dumps(body).replace('"ID"', json.dumps(ids["conv-1"])))
    got, _, payload = post(server.url, body)
    assert (got, payload["error"]["type"]) == (status, kind), payload
    assert message in payload["error"]["message"] and set(payload) == {"error"}


def test_http_edges_are_answered_before_the_body_is_read(server):
    head = "POST /score HTTP/1.1\r\nHost: x\r\n"
    # None of these sends a body: an answer at all shows the server did not wait for one.
    assert raw(server.url, (head + "\r\n").encode())[0] == 411
    assert raw(server.url, (head + "Transfer-Encoding: chunked\r\n\r\n").encode())[0] == 411
    status, headers, payload = raw(server.url, (head + f"Content-Length: {2**20 + 1}\r\n\r\n").encode())
    assert status == 413 and "over the limit of 1048576 bytes" in payload["error"]["message"]
    assert headers["Connection"] == "close"
    assert raw(server.url, (head + "Content-Length: -5\r\n\r\n").encode())[0] == 400
    assert raw(server.url, (head + "Content-Length: " + "9" * 5000 + "\r\n\r\n").encode())[0] == 400
    assert raw(server.url, b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n")[0] == 404
    status, headers, _ = raw(server.url, b"GET /score HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 405 and headers["Allow"] == "POST"


def test_a_short_body_times_out_instead_of_blocking_a_handler(store):
    with serve(toy_scorer(store), store, socket_timeout_s=0.2) as s:
        status, _, payload = raw(s.url, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"req")
        assert status == 408 and payload["error"]["type"] == "timeout"
        assert health(s.url)["status"] == "ok"  # and the server still serves


def test_idle_connections_cannot_pile_up_threads(store, ids):
    with serve(toy_scorer(store), store, max_connections=2) as s:
        host, port = s.url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port)), timeout=60) for _ in range(2)]  # send nothing
        wait_until(lambda: s._httpd.open_connections == 2, "both idle connections hold a handler")
        status, headers, payload = raw(s.url, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (status, payload["error"]["type"], headers["Retry-After"]) == (503, "overloaded", "1")
        for sock in idle:
            sock.close()
        wait_until(lambda: s._httpd.open_connections == 0, "the idle connections' handlers ended")
        assert RemoteReward(s.url)([request(ids["conv-1"])])[0].task_rewards == (1.0,)


def test_bearer_token_is_required_and_checked_before_the_body(store, ids):
    body = {"requests": [request(ids["conv-1"]).to_dict()]}
    with serve(toy_scorer(store), store, token=TOKEN) as s:
        assert post(s.url, body)[0] == 401
        status, headers, payload = post(s.url, body, token="s3cret-tokem")
        assert (status, payload["error"]["type"]) == (401, "unauthorized") and headers["WWW-Authenticate"] == "Bearer"
        assert post(s.url, body, token=TOKEN)[0] == 200
        # Content-Length announced, no body sent, socket timeout 60 s: a 401 now proves the body
        # was never waited for.
        status, _, _ = raw(s.url, b"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\n"
                                  b"Content-Length: 1000\r\n\r\n")
        assert status == 401
        # A refused client still sending a large body (20 MB, never read) gets its 401, not a broken
        # connection to retry.
        big = request(ids["conv-1"], outputs=({"core": "x" * 20_000_000},))
        with pytest.raises(RewardServerError, match="401 unauthorized"):
            RemoteReward(s.url, token="nope", retries=3)([big])
        assert health(s.url)["status"] == "ok"  # /health stays open (counts only)
        with pytest.raises(RewardServerError, match="401 unauthorized") as e:
            RemoteReward(s.url, token="wrong", retries=3)([request(ids["conv-1"])])
        assert e.value.status == 401
        assert len(RemoteReward(s.url, token=TOKEN)([request(ids["conv-1"])])) == 1


def test_a_failing_or_lying_scorer_gives_500_and_the_client_does_not_retry(store, ids):
    calls = []

    def gate(req):
        calls.append(req.session_id)
        if req.session_id == "boom":
            raise RuntimeError("judge crashed")

    def lying(requests):
        out = toy_scorer(store)(requests)
        if requests[0].session_id == "nan":
            s = out[0].samples[0]
            out[0] = SessionReward(out[0].session_id, (SampleReward(**{**s.__dict__, "reward": math.nan}),))
        if requests[0].session_id == "short":
            out = out[:1]
        if requests[0].session_id == "swap":
            out.reverse()
        return out

    with serve(toy_scorer(store, gate), store) as s:
        with pytest.raises(RewardServerError, match=r"500 scorer_error: the scorer raised RuntimeError: judge crashed"):
            RemoteReward(s.url, retries=3)([request(ids["conv-1"], session_id="boom")])
        assert calls == ["boom"]  # a 500 is not retried
    with serve(lying, store) as s:
        client = RemoteReward(s.url)
        with pytest.raises(RewardServerError, match="non-finite"):
            client([request(ids["conv-1"], session_id="nan")])
        with pytest.raises(RewardServerError, match="2 requests gave 1 items"):
            client([request(ids["conv-1"], session_id="short"), request(ids["conv-1"], session_id="b")])
        with pytest.raises(RewardServerError, match="reward 0 is for session 'b', request 0 for 'swap'"):
            client([request(ids["conv-1"], session_id="swap"), request(ids["conv-1"], session_id="b")])


# ---- concurrency limit and shutdown ------------------------------------------------------------

def _blocking(store, release: threading.Event):
    return toy_scorer(store, lambda req: req.session_id == "block" and release.wait())


def test_over_capacity_is_503_with_retry_after_and_the_client_retries(store, ids):
    release = threading.Event()
    with serve(_blocking(store, release), store, max_concurrency=1, max_queue=0, retry_after_s=0) as s:
        pool = ThreadPoolExecutor(2)
        first = pool.submit(RemoteReward(s.url), [request(ids["conv-1"], session_id="block")])
        wait_until(lambda: health(s.url)["in_flight"] == 1, "the blocking call is scoring")
        status, headers, payload = post(s.url, {"requests": [request(ids["conv-1"]).to_dict()]})
        assert (status, payload["error"]["type"], headers["Retry-After"]) == (503, "overloaded", "0")
        # Turned away from the headers alone: a body announced but never sent is not waited for.
        assert raw(s.url, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")[0] == 503
        # A patient client retries through 503s and gets its answer once the slot frees.
        second = pool.submit(RemoteReward(s.url, retries=100_000, backoff_s=0.01, max_backoff_s=0.02),
                             [request(ids["conv-1"], session_id="later")])
        wait_until(lambda: health(s.url)["rejected"] >= 4, "the client was turned away and retried")
        release.set()
        assert first.result(timeout=60)[0].session_id == "block"
        assert second.result(timeout=60)[0].task_rewards == (1.0,)
        pool.shutdown()


def test_shutdown_lets_in_flight_scoring_finish_within_the_grace(store, ids):
    release = threading.Event()
    s = RewardServer(_blocking(store, release), store, port=0, limits=LIMITS).start()
    pool = ThreadPoolExecutor(2)
    call = pool.submit(RemoteReward(s.url, retries=0), [request(ids["conv-1"], session_id="block")])
    wait_until(lambda: health(s.url)["in_flight"] == 1, "the call is scoring")
    stopping = pool.submit(s.shutdown, 60)
    wait_until(lambda: s._draining, "shutdown began")
    release.set()
    assert call.result(timeout=60)[0].task_rewards == (1.0,)
    assert stopping.result(timeout=60) == {"finished_in_grace": True, "aborted": 0}
    with pytest.raises(RewardServerError, match="cannot connect"):  # no longer accepting
        RemoteReward(s.url, retries=0)([request(ids["conv-1"])])
    pool.shutdown()


def test_shutdown_answers_503_for_scoring_past_the_grace(store, ids):
    release = threading.Event()
    try:
        s = RewardServer(_blocking(store, release), store, port=0, limits=LIMITS).start()
        with ThreadPoolExecutor(1) as pool:
            call = pool.submit(post, s.url, {"requests": [request(ids["conv-1"], session_id="block").to_dict()]})
            wait_until(lambda: health(s.url)["in_flight"] == 1, "the call is scoring")
            assert s.shutdown(grace_s=0) == {"finished_in_grace": False, "aborted": 1}
            status, headers, payload = call.result(timeout=60)
        assert (status, payload["error"]["type"]) == (503, "shutting_down") and "Retry-After" in headers
    finally:
        release.set()


# ---- the command line in a subprocess -------------------------------------------------------------

def subprocess_scorer(store, args):
    """--scorer factory for the subprocess tests: session "block" never finishes."""
    return _blocking(store, threading.Event()), {"scorer": "toy"}


@contextmanager
def server_process(store, *extra):
    cmd = [sys.executable, "-m", "reward.server", "--snapshots", str(store.root), "--port", "0",
           "--scorer", "tests.reward.test_server:subprocess_scorer", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MEMBUILDER_REWARD_TOKEN": ""})
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        line = lines.get(timeout=60)
        assert "listening on" in line, line + proc.stderr.read()
        yield proc, line.split()[-1]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_server_answers_in_flight_503_and_exits_0(store, ids, sig):
    with server_process(store, "--shutdown-grace-s", "0.2") as (proc, url):
        assert health(url)["reward"] == {"scorer": "toy"}
        with ThreadPoolExecutor(1) as pool:
            call = pool.submit(post, url, {"requests": [request(ids["conv-1"], session_id="block").to_dict()]})
            wait_until(lambda: health(url)["in_flight"] == 1, "the call is scoring")
            proc.send_signal(sig)
            status, _, payload = call.result(timeout=60)
        assert (status, payload["error"]["type"]) == (503, "shutting_down")
        assert proc.wait(timeout=60) == 0, proc.stderr.read()


def test_client_gets_a_clear_error_when_the_server_is_killed_mid_call(store, ids):
    with server_process(store) as (proc, url):
        client = RemoteReward(url, retries=2, backoff_s=0.01, connect_timeout_s=5, timeout_s=60)
        assert client([request(ids["conv-1"])])[0].task_rewards == (1.0,)
        with ThreadPoolExecutor(1) as pool:
            call = pool.submit(client, [request(ids["conv-1"], session_id="block")])
            wait_until(lambda: health(url)["in_flight"] == 1, "the call is scoring")
            proc.kill()
            with pytest.raises(RewardServerError) as e:
                call.result(timeout=60)
    assert url in str(e.value) and "failed after 3 attempts: cannot connect" in str(e.value)


def test_client_errors_for_a_silent_server_and_for_no_server():
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (backlog) but never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(RewardServerError, match=r"no answer to POST /score within 0.2 s") as e:
            RemoteReward(url, timeout_s=0.2, retries=5)([request("0" * 64)])
        assert url in str(e.value) and e.value.status is None
    with pytest.raises(RewardServerError, match=r"failed after 2 attempts: cannot connect"):
        RemoteReward(url, retries=1, backoff_s=0)([request("0" * 64)])


def test_client_rejects_bad_arguments():
    with pytest.raises(ValueError, match="base_url"):
        RemoteReward("ftp://x")
    with pytest.raises(ValueError, match="ASCII"):
        RemoteReward("http://127.0.0.1:1", token="jeton-é")
    assert "s3cret" not in repr(RemoteReward("http://127.0.0.1:1", token="s3cret"))
    assert RemoteReward("http://127.0.0.1:1")([]) == []


# ---- the reward library behind the server ---------------------------------------------------------

def _library(store, **config):
    from membuilder.answering import ExtractiveAnswerer
    from membuilder.judging import RuleJudge
    from reward.config import RewardConfig
    from reward.score import make_reward_fn
    from tests.reward.helpers import words

    answerer = config.pop("answerer", ExtractiveAnswerer())
    return make_reward_fn(snapshots=store, token_counter=words, answerer=answerer, judge=RuleJudge(),
                          config=RewardConfig(**config))


def _timeless(rewards):
    return [dataclasses.replace(r, elapsed_s=0.0) for r in rewards]


def test_the_library_served_over_http_gives_its_in_process_rewards(tmp_path):
    from tests.reward.helpers import BIKE, outputs, put_state
    from tests.reward.helpers import request as lib_request

    store, sid = put_state(tmp_path)
    reward_fn = _library(store)
    # The state before knows Paris; candidate 0 adds "Ann named her new bike Rocket", candidate 1
    # adds nothing: T = 2/2 = 1.0 and 1/2 = 0.5 (no length penalty: every output is within 200
    # tokens of the expert's 0).
    reqs = [lib_request(sid, [outputs(semantic=BIKE), outputs()])]
    with serve(reward_fn, store) as s:
        got = RemoteReward(s.url)(reqs)
    assert got[0].task_rewards == (1.0, 0.5)
    assert got[0].sample("semantic", 0).weight == 4.0  # the bike entry is semantic: dominant
    assert _timeless(got) == _timeless(reward_fn(reqs))


def test_a_library_answerer_that_times_out_comes_back_masked_not_zero(tmp_path):
    from membuilder.answering import ExtractiveAnswerer
    from tests.reward.helpers import BIKE, outputs, put_state
    from tests.reward.helpers import request as lib_request

    store, sid = put_state(tmp_path)
    release = threading.Event()

    class Stuck:  # never answers about the bike (candidate 0), answers the rest at once
        name = "stuck"

        def answer(self, question, context):
            if any("Rocket" in h.entry.text for h in context.hits):
                release.wait()
            return ExtractiveAnswerer().answer(question, context)

    try:
        with serve(_library(store, answerer=Stuck(), call_timeout_s=0.05), store) as s:
            (got,) = RemoteReward(s.url)([lib_request(sid, [outputs(semantic=BIKE), outputs()])])
    finally:
        release.set()
    assert got.task_rewards == (None, 0.5)
    for agent in AGENTS:
        masked, kept = got.sample(agent, 0), got.sample(agent, 1)
        assert masked.masked and masked.reward is None and masked.task_reward is None
        assert "no answer within call_timeout_s=0.05" in masked.mask_reason
        assert not kept.masked and kept.reward == 0.5


def _word_tokenizer(folder: Path) -> Path:
    """A tokenizer folder whose token count is the number of whitespace-separated words (every word
    is [UNK] in a one-entry vocabulary), so it counts exactly like tests.reward.helpers.words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"}))
    return folder


@pytest.mark.slow
def test_the_command_line_serves_the_library_and_stops_on_sigterm(tmp_path):
    # `python -m reward.server` with the library (no --scorer): same rewards as in-process, the
    # configuration on /health, exit 0 on SIGTERM.
    from tests.reward.helpers import BIKE, outputs, put_state
    from tests.reward.helpers import request as lib_request

    store, sid = put_state(tmp_path)
    tokenizer = _word_tokenizer(tmp_path / "tok")
    cmd = [sys.executable, "-m", "reward.server", "--snapshots", str(store.root), "--port", "0",
           "--tokenizer", str(tokenizer), "--embedder", "none", "--set", "call_timeout_s=30"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MEMBUILDER_REWARD_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"})
    try:
        line = proc.stdout.readline()
        assert "listening on" in line, line + proc.stderr.read()
        url = line.split()[-1]
        h = health(url)
        assert h["reward"]["config"]["call_timeout_s"] == 30 and h["reward"]["answerer"] == "extractive"
        assert h["reward"]["judge"] == "rule" and h["reward"]["embedder"] is None
        reqs = [lib_request(sid, [outputs(semantic=BIKE), outputs()])]
        with pytest.raises(RewardServerError, match="401"):
            RemoteReward(url)(reqs)
        got = RemoteReward(url, token=TOKEN)(reqs)
        assert _timeless(got) == _timeless(_library(store, call_timeout_s=30)(reqs))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
