"""LLM client against a local OpenAI-compatible server with scripted responses.

The server pops one scripted action per request (per path); with nothing scripted it answers
validly, echoing the request. A message whose content starts with "status:NNN" gets that HTTP
status whatever the order of arrival, which keeps concurrent tests deterministic.
"""

import asyncio
import json
import random
import socket
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest

from membuilder.llm import (
    ChatRequest,
    LLMClient,
    LLMConfig,
    LLMConfigError,
    LLMRequestError,
    LLMResponseError,
    LLMRetriesExhausted,
    UsageStats,
    request_cache_key,
)

PROMPT_TOKENS, COMPLETION_TOKENS = 7, 3
CHAT = "/v1/chat/completions"


class ScriptedServer:
    def __init__(self):
        self.scripts: dict[str, deque] = {}
        self.requests: list[dict] = []  # {"path", "body", "auth"} in arrival order
        self.lock = threading.Condition()
        self.in_flight = 0
        self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length))
                with server.lock:
                    server.requests.append({"path": self.path, "body": body,
                                            "auth": self.headers.get("authorization")})
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server.lock.notify_all()
                    script = server.scripts.get(self.path)
                    action = script.popleft() if script else None
                try:
                    status, headers, payload = server.respond(self.path, body, action)
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()

    def push(self, path: str, *actions):
        self.scripts.setdefault(path, deque()).extend(actions)

    def paths(self) -> list[str]:
        return [r["path"] for r in self.requests]

    def respond(self, path, body, action):
        if action is None:
            action = ("default",)
        kind = action[0]
        if kind == "sleep":  # longer than the client's timeout
            time.sleep(action[1])
            action = ("default",)
            kind = "default"
        if kind == "hold":  # wait until `target` requests were in flight at once (or 5 s), then linger
            with self.lock:
                self.lock.wait_for(lambda: self.max_in_flight >= action[1], timeout=5.0)
            time.sleep(0.05)  # so that requests sent past a broken limit would overlap this one
            kind = "default"
        if kind == "status":
            _, code, message, headers = action
            err = json.dumps({"error": {"message": message, "type": "test_error"}}).encode()
            return code, {"content-type": "application/json", **headers}, err
        if kind == "raw":
            return 200, {"content-type": action[2]}, action[1]
        if path.endswith("/embeddings"):
            items = [{"object": "embedding", "index": i, "embedding": [float(len(t)), float(i)]}
                     for i, t in enumerate(body["input"])]
            # reversed on purpose: the client must order by "index"
            out = {"object": "list", "data": items[::-1], "model": body["model"],
                   "usage": {"prompt_tokens": 4 * len(items), "total_tokens": 4 * len(items)}}
            return 200, {"content-type": "application/json"}, json.dumps(out).encode()
        content = body["messages"][-1]["content"]
        if content.startswith("status:"):
            code = int(content.split(":")[1])
            err = json.dumps({"error": {"message": f"scripted {code}"}}).encode()
            return code, {"content-type": "application/json"}, err
        finish = action[1] if kind == "finish" else "stop"
        out = {
            "id": f"cmpl-{len(self.requests)}", "object": "chat.completion", "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "finish_reason": finish,
                         "message": {"role": "assistant",
                                     "content": f"echo:{content}|t={body.get('temperature')}"}}],
            "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
                      "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS},
        }
        return 200, {"content-type": "application/json"}, json.dumps(out).encode()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def status(code, message="scripted", headers=None):
    return ("status", code, message, headers or {})


@pytest.fixture
def server():
    s = ScriptedServer()
    yield s
    s.close()


class SleepRecorder:
    def __init__(self):
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def make_client(server, sleep=None, **overrides):
    cfg = dict(base_url=f"{server.url}/v1", api_key="sk-chat", model="test-model", timeout_s=5.0,
               max_retries=3, backoff_base_s=0.5, backoff_max_s=30.0, jitter=0.0, max_concurrency=4)
    cfg.update(overrides)
    return LLMClient(LLMConfig(**cfg), sleep=sleep or SleepRecorder())


USER = [{"role": "user", "content": "hello"}]


def test_chat_result_usage_and_request_body(server):
    client = make_client(server)
    result = client.chat(USER, temperature=0.3, max_tokens=16)
    assert result.text == "echo:hello|t=0.3"
    assert result.finish_reason == "stop" and not result.truncated and not result.cached
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (7, 3)
    assert result.response_id == "cmpl-1" and result.model == "test-model"
    body = server.requests[0]["body"]
    # None parameters (seed, top_p, stop, ...) are left out so the server defaults apply
    assert body == {"model": "test-model", "messages": USER, "temperature": 0.3, "max_tokens": 16}
    assert server.requests[0]["auth"] == "Bearer sk-chat"
    assert client.usage() == UsageStats(calls=1, requests=1, prompt_tokens=7, completion_tokens=3)


def test_429_then_success_backs_off_exponentially(server):
    sleep = SleepRecorder()
    client = make_client(server, sleep)
    server.push(CHAT, status(429), status(429))
    result = client.chat(USER)
    assert result.text.startswith("echo:hello")
    # base 0.5 s, jitter 0: 0.5 * 2**0, 0.5 * 2**1
    assert sleep.delays == [0.5, 1.0]
    # only the successful response carries tokens
    assert client.usage() == UsageStats(calls=1, requests=3, retries=2, prompt_tokens=7, completion_tokens=3)


def test_500_then_success_and_retry_after_header(server):
    sleep = SleepRecorder()
    client = make_client(server, sleep)
    server.push(CHAT, status(503, headers={"retry-after": "3"}), status(500))
    client.chat(USER)
    # retry 0: max(0.5, Retry-After 3) = 3; retry 1: 0.5 * 2 = 1.0 (no header)
    assert sleep.delays == [3.0, 1.0]
    assert client.usage().retries == 2


@pytest.mark.parametrize("code", [408, 409, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retried(server, code):
    sleep = SleepRecorder()
    client = make_client(server, sleep)
    server.push(CHAT, status(code))
    assert client.chat(USER).text.startswith("echo:")
    assert len(server.requests) == 2 and sleep.delays == [0.5]


@pytest.mark.parametrize("code", [400, 401, 403, 404, 422])
def test_other_4xx_fail_at_once(server, code):
    sleep = SleepRecorder()
    client = make_client(server, sleep)
    server.push(CHAT, status(code, message="bad param foo"))
    with pytest.raises(LLMRequestError) as info:
        client.chat(USER)
    err = info.value
    assert err.status_code == code and err.attempts == 1
    assert f"HTTP {code}" in str(err) and "bad param foo" in str(err)
    assert isinstance(err.cause, openai.APIStatusError) and err.__cause__ is err.cause
    assert sleep.delays == [] and len(server.requests) == 1
    assert client.usage() == UsageStats(calls=1, requests=1, failures=1)


def test_retries_exhausted_raises_with_cause(server):
    sleep = SleepRecorder()
    client = make_client(server, sleep, max_retries=2)
    server.push(CHAT, status(500), status(500), status(500), status(500))
    with pytest.raises(LLMRetriesExhausted) as info:
        client.chat(USER)
    err = info.value
    assert err.attempts == 3 and err.status_code == 500
    assert isinstance(err.cause, openai.InternalServerError)
    assert "after 3 attempt(s)" in str(err) and "HTTP 500" in str(err)
    assert sleep.delays == [0.5, 1.0]
    assert client.usage() == UsageStats(calls=1, requests=3, retries=2, failures=1)


def test_timeout_is_retried_then_succeeds(server):
    sleep = SleepRecorder()
    client = make_client(server, sleep, timeout_s=0.2)
    server.push(CHAT, ("sleep", 1.0))
    assert client.chat(USER).text == "echo:hello|t=None"
    assert sleep.delays == [0.5] and client.usage().retries == 1


def test_timeout_every_time_raises_timeout_cause(server):
    sleep = SleepRecorder()
    client = make_client(server, sleep, timeout_s=0.2, max_retries=1)
    server.push(CHAT, ("sleep", 1.0), ("sleep", 1.0))
    with pytest.raises(LLMRetriesExhausted) as info:
        client.chat(USER)
    assert isinstance(info.value.cause, openai.APITimeoutError)
    assert info.value.status_code is None and info.value.attempts == 2


def test_connection_refused_is_transient():
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleep = SleepRecorder()
    client = LLMClient(LLMConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=1,
                                 backoff_base_s=0.25, jitter=0.0), sleep=sleep)
    with pytest.raises(LLMRetriesExhausted) as info:
        client.chat(USER)
    assert isinstance(info.value.cause, openai.APIConnectionError)
    assert sleep.delays == [0.25]


@pytest.mark.parametrize("payload,ctype,fragment", [
    (b'{"id": "x", "choices": [ {not json', "application/json", "not valid JSON"),
    (b"<html>gateway oops</html>", "text/html", "not valid JSON"),
    (b'{"id": "x"}', "application/json", "no 'choices'"),
    (b'{"choices": [{"index": 0}]}', "application/json", "no 'message'"),
    (b'{"error": {"message": "overloaded"}}', "application/json", "overloaded"),
    (b"[1, 2]", "application/json", "not an object"),
])
def test_malformed_body_is_a_clear_error_not_retried(server, payload, ctype, fragment):
    sleep = SleepRecorder()
    client = make_client(server, sleep)
    server.push(CHAT, ("raw", payload, ctype))
    with pytest.raises(LLMResponseError, match=fragment):
        client.chat(USER)
    assert len(server.requests) == 1 and sleep.delays == []
    assert client.usage().failures == 1


def test_reasoning_field_and_missing_usage(server):
    client = make_client(server)
    body = {"id": "r1", "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": "42",
                                                 "reasoning_content": "6 * 7"}}]}
    server.push(CHAT, ("raw", json.dumps(body).encode(), "application/json"))
    result = client.chat(USER)
    assert (result.text, result.reasoning, result.response_id) == ("42", "6 * 7", "r1")
    assert result.usage.total_tokens == 0 and client.usage().prompt_tokens == 0


def test_length_finish_is_returned_flagged_not_retried(server):
    client = make_client(server)
    server.push(CHAT, ("finish", "length"))
    result = client.chat(USER, max_tokens=4)
    assert result.truncated and result.finish_reason == "length"
    assert len(server.requests) == 1


def test_cache_skips_identical_requests_and_persists(server, tmp_path):
    cache = tmp_path / "llm_cache.sqlite"
    client = make_client(server, cache_path=str(cache))
    first = client.chat(USER, temperature=0.0)
    second = client.chat(USER, temperature=0.0)
    assert len(server.requests) == 1
    assert second.cached and not first.cached and second.text == first.text
    assert second.usage == first.usage  # the usage the original call reported
    # the hit is counted, and its tokens are not paid twice
    assert client.usage() == UsageStats(calls=2, cache_hits=1, requests=1, prompt_tokens=7, completion_tokens=3)

    client.chat(USER, temperature=0.7)  # any sampling parameter changes the key
    assert len(server.requests) == 2
    client.chat(USER, temperature=0.0, use_cache=False)  # explicit bypass
    assert len(server.requests) == 3
    client.close()

    rerun = make_client(server, cache_path=str(cache))  # a later run on the same cache file
    assert rerun.chat(USER, temperature=0.0).cached
    assert len(server.requests) == 3


def test_errors_are_not_cached(server, tmp_path):
    client = make_client(server, cache_path=str(tmp_path / "c.sqlite"))
    server.push(CHAT, status(400))
    with pytest.raises(LLMRequestError):
        client.chat(USER)
    assert not client.chat(USER).cached
    assert len(server.requests) == 2


def test_cache_key_covers_the_whole_request():
    base = {"model": "m", "messages": [{"role": "user", "content": "q"}], "temperature": 0.0}
    key = request_cache_key("chat", "http://a/v1", base)
    # key order inside the payload does not matter
    assert key == request_cache_key("chat", "http://a/v1", dict(reversed(list(base.items()))))
    variants = [
        ("chat", "http://b/v1", base),
        ("embeddings", "http://a/v1", base),
        ("chat", "http://a/v1", {**base, "model": "m2"}),
        ("chat", "http://a/v1", {**base, "messages": [{"role": "user", "content": "q2"}]}),
        ("chat", "http://a/v1", {**base, "temperature": 0.5}),
        ("chat", "http://a/v1", {**base, "top_p": 0.9}),
        ("chat", "http://a/v1", {**base, "max_tokens": 10}),
        ("chat", "http://a/v1", {**base, "seed": 1}),
        ("chat", "http://a/v1", {**base, "stop": ["\n"]}),
        ("chat", "http://a/v1", {**base, "extra_body": {"top_k": 5}}),
    ]
    keys = {request_cache_key(*v) for v in variants}
    assert key not in keys and len(keys) == len(variants)


def test_concurrency_limit_is_respected(server):
    client = make_client(server, max_concurrency=2)
    n = 8
    # each request waits until two were in flight together (the limit is reached) and then
    # lingers, so a client sending past the limit would push the server's high-water mark above 2
    server.push(CHAT, *[("hold", 2)] * n)
    requests = [ChatRequest(messages=[{"role": "user", "content": f"q{i}"}]) for i in range(n)]
    results = client.map_chat(requests, max_workers=n)
    assert [r.text for r in results] == [f"echo:q{i}|t=None" for i in range(n)]
    assert server.max_in_flight == 2
    # thread-safe accounting: 8 calls of 7 + 3 tokens
    assert client.usage() == UsageStats(calls=8, requests=8, prompt_tokens=56, completion_tokens=24)


def test_map_chat_keeps_order_and_reports_failures(server):
    client = make_client(server, max_concurrency=3)
    reqs = [ChatRequest(messages=[{"role": "user", "content": c}]) for c in ("a", "status:400", "c")]
    out = client.map_chat(reqs, return_exceptions=True)
    assert out[0].text == "echo:a|t=None" and out[2].text == "echo:c|t=None"
    assert isinstance(out[1], LLMRequestError) and out[1].status_code == 400
    with pytest.raises(LLMRequestError):
        client.map_chat(reqs)
    assert len(server.requests) == 6  # the failing batch still ran to the end


def test_embeddings_on_a_separate_endpoint(server):
    client = make_client(server, embedding_base_url=f"{server.url}/emb/v1", embedding_model="emb-model",
                         embedding_api_key="sk-emb", embedding_batch_size=2)
    vectors = client.embed(["a", "bbb", "cc"])
    # the server returns [len(text), index-in-batch], reversed; the client restores the order
    assert vectors == [[1.0, 0.0], [3.0, 1.0], [2.0, 0.0]]
    assert server.paths() == ["/emb/v1/embeddings"] * 2
    assert all(r["auth"] == "Bearer sk-emb" for r in server.requests)
    assert server.requests[0]["body"] == {"model": "emb-model", "input": ["a", "bbb"], "encoding_format": "float"}
    # two batches: 2 calls; 4 tokens per input
    assert client.usage() == UsageStats(calls=2, requests=2, embedding_tokens=12)


def test_embeddings_cache_and_errors(server, tmp_path):
    client = make_client(server, embedding_model="e", cache_path=str(tmp_path / "c.sqlite"))
    assert client.embed(["xy"]) == client.embed(["xy"]) == [[2.0, 0.0]]
    assert server.paths() == ["/v1/embeddings"]  # same endpoint as chat when none is given
    server.push("/v1/embeddings", ("raw", b'{"data": []}', "application/json"))
    with pytest.raises(LLMResponseError, match="0 items in 'data', expected 1"):
        client.embed(["zz"])
    with pytest.raises(TypeError):
        client.embed("not a list")


def test_config_from_environment():
    env = {"OPENAI_BASE_URL": "http://openai-env/v1", "MEMBUILDER_LLM_BASE_URL": "http://mb-env/v1",
           "OPENAI_API_KEY": "k-openai", "MEMBUILDER_LLM_MODEL": "env-model",
           "MEMBUILDER_EMBED_MODEL": "env-emb"}
    cfg = LLMConfig.from_env(env)
    assert (cfg.base_url, cfg.api_key, cfg.model, cfg.embedding_model) == (
        "http://mb-env/v1", "k-openai", "env-model", "env-emb")
    cfg = LLMConfig.from_env(env, model="arg-model", base_url=None, timeout_s=3.0)
    assert cfg.model == "arg-model" and cfg.base_url == "http://mb-env/v1" and cfg.timeout_s == 3.0
    with pytest.raises(LLMConfigError, match="unknown LLMConfig fields"):
        LLMConfig.from_env(env, modle="typo")
    with pytest.raises(LLMConfigError, match="max_concurrency"):
        LLMConfig(max_concurrency=0)


def test_missing_model_or_endpoint_fails_before_any_request(server):
    client = LLMClient(LLMConfig.from_env({}, base_url=f"{server.url}/v1"), sleep=SleepRecorder())
    with pytest.raises(LLMConfigError, match="no chat model"):
        client.chat(USER)
    nowhere = LLMClient(LLMConfig.from_env({}, model="m"), sleep=SleepRecorder())
    with pytest.raises(LLMConfigError, match="no API key and no base URL"):
        nowhere.chat(USER)
    assert server.requests == []
    # a local server needs no key: the fixed keyless-server key is sent
    client = LLMClient(LLMConfig.from_env({}, base_url=f"{server.url}/v1", model="m"))
    client.chat(USER)
    assert server.requests[0]["auth"] == "Bearer not-needed"


def test_backoff_jitter_and_cap():
    cfg = LLMConfig(model="m", backoff_base_s=1.0, backoff_max_s=5.0, jitter=0.5)
    client = LLMClient(cfg, rng=random.Random(0))
    u = random.Random(0)
    expected = []
    for k in range(5):
        d = min(5.0, 2.0 ** k)  # 1, 2, 4, 5 (capped), 5
        expected.append(d * (1 - 0.5 * u.random()))
    got = [client.backoff_delay(k) for k in range(5)]
    assert got == pytest.approx(expected)
    assert all(0.5 * d <= g <= d for g, d in zip(got, [1, 2, 4, 5, 5]))
    # Retry-After raises the delay, but never above the cap
    assert client.backoff_delay(0, retry_after=3.0) == 3.0
    assert client.backoff_delay(0, retry_after=60.0) == 5.0


def test_achat_wraps_the_sync_call(server):
    client = make_client(server)
    result = asyncio.run(client.achat(USER, temperature=0.1))
    assert result.text == "echo:hello|t=0.1" and client.usage().calls == 1


def test_usage_snapshots_subtract():
    a = UsageStats(calls=5, requests=7, retries=2, prompt_tokens=100)
    b = UsageStats(calls=2, requests=2, prompt_tokens=30)
    assert a - b == UsageStats(calls=3, requests=5, retries=2, prompt_tokens=70)
    assert (a - b).total_tokens == 70


# --- issue 11, items 10-14 ------------------------------------------------------------------------


class DripServer:
    """Answers every request with valid headers and a valid chat body, one byte per `gap_s`.
    `sent` is how many body bytes left the server before the client hung up."""

    def __init__(self, gap_s: float):
        body = {"id": "x", "object": "chat.completion", "model": "m",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "slow " * 20}}]}
        self.body = json.dumps(body).encode()
        self.gap_s = gap_s
        self.sent = None
        self.done = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        conn, _ = self.sock.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, rest = data.split(b"\r\n\r\n", 1)
            length = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
            while len(rest) < length:
                rest += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n" % len(self.body))
            sent = 0
            try:
                for i in range(len(self.body)):
                    conn.sendall(self.body[i:i + 1])
                    sent += 1
                    time.sleep(self.gap_s)
            except OSError:  # the client closed the connection
                pass
            self.sent = sent
            self.done.set()

    def close(self):
        self.sock.close()


def test_timeout_is_a_whole_request_deadline_not_per_read():
    # the body (~200 bytes) arrives one byte every 20 ms: no single read waits long, so a per-read
    # timeout of 0.3 s never fires and the call took the whole drip (~4 s; 131 s in the report).
    # With a whole-request deadline the client gives up after 0.3 s, long before the end.
    drip = DripServer(gap_s=0.02)
    try:
        client = LLMClient(LLMConfig(base_url=drip.url, api_key="k", model="m", timeout_s=0.3, max_retries=0),
                           sleep=SleepRecorder())
        with pytest.raises(LLMRetriesExhausted) as info:
            client.chat(USER)
        assert isinstance(info.value.cause, openai.APITimeoutError)
        assert drip.done.wait(10)
        # the server noticed the hang-up before it had sent the whole body (write errors show up
        # a few bytes late through the socket buffer, hence the margin of half the body)
        assert drip.sent < len(drip.body) // 2
    finally:
        drip.close()


def test_deadline_caps_each_network_operation():
    from membuilder import llm_deadline

    class Inner:
        def __init__(self):
            self.timeouts = []

        def read(self, n, timeout=None):
            self.timeouts.append(timeout)
            return b"x"

    import importlib

    # the HTTP core module the installed openai SDK is built on (httpcore, or a renamed fork)
    backend = openai.DefaultHttpxClient()._transport._pool._network_backend
    core = importlib.import_module(type(backend).__module__.split(".")[0])

    _, stream_cls = llm_deadline.deadline_classes(core)
    inner = Inner()
    stream = stream_cls(inner)
    stream.read(1, timeout=7.0)  # no deadline set: the timeout passes through unchanged
    with llm_deadline.request_deadline(1000.0):
        stream.read(1, timeout=None)  # no per-read timeout: the deadline's remainder is used
        stream.read(1, timeout=5.0)  # shorter than what is left: kept
    assert inner.timeouts[0] == 7.0 and 990.0 < inner.timeouts[1] <= 1000.0 and inner.timeouts[2] == 5.0
    with llm_deadline.request_deadline(-1.0):  # already past: no read is attempted
        with pytest.raises(core.ReadTimeout, match="deadline"):
            stream.read(1, timeout=5.0)
    assert len(inner.timeouts) == 3


@pytest.mark.parametrize("usage, fragment", [
    ({"prompt_tokens": "seven", "completion_tokens": 3}, "usage.prompt_tokens must be a non-negative integer"),
    ({"prompt_tokens": [7], "completion_tokens": 3}, "usage.prompt_tokens"),
    ({"prompt_tokens": 7, "completion_tokens": -3}, "usage.completion_tokens"),
    ({"prompt_tokens": 7, "completion_tokens": True}, "usage.completion_tokens"),
    ([7, 3], "'usage' is a list"),
])
def test_malformed_usage_is_a_response_error(server, usage, fragment):
    body = {"id": "x", "model": "m", "usage": usage,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}]}
    server.push(CHAT, ("raw", json.dumps(body).encode(), "application/json"))
    client = make_client(server)
    with pytest.raises(LLMResponseError, match=fragment.replace("[", r"\[")):
        client.chat(USER)
    # map_chat with return_exceptions hands it back in its slot instead of raising
    server.push(CHAT, ("raw", json.dumps(body).encode(), "application/json"))
    out = client.map_chat([ChatRequest(messages=USER)], return_exceptions=True, max_workers=1)
    assert isinstance(out[0], LLMResponseError)


def test_unreadable_numbers_in_a_body_are_a_response_error(server):
    huge = b'{"id": "x", "usage": {"prompt_tokens": ' + b"9" * 5000 + b'}, "choices": []}'
    server.push(CHAT, ("raw", huge, "application/json"))
    with pytest.raises(LLMResponseError, match="cannot be read"):
        make_client(server).chat(USER)


def test_integral_float_usage_is_accepted(server):
    body = {"id": "x", "model": "m", "usage": {"prompt_tokens": 7.0, "completion_tokens": None},
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}]}
    server.push(CHAT, ("raw", json.dumps(body).encode(), "application/json"))
    result = make_client(server).chat(USER)
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (7, 0)


@pytest.mark.parametrize("indices, ok", [
    ([1, 0], True),  # reordered: fine
    ([None, None], True),  # no index at all: list order
    ([0, 0], False),  # duplicate: one input would get the other's vector
    ([0, 2], False),  # out of range
    ([0, None], False),
    ([True, 0], False),
])
def test_embedding_indices_must_name_each_input_once(server, indices, ok):
    items = [{"embedding": [float(k), 1.0], **({} if i is None else {"index": i})}
             for k, i in enumerate(indices)]
    server.push("/v1/embeddings", ("raw", json.dumps({"data": items}).encode(), "application/json"))
    client = make_client(server, embedding_model="e")
    if ok:
        vectors = client.embed(["a", "b"])
        # item k carries [k, 1]; it belongs at position indices[k] (list order without indices)
        expected = [[1.0, 1.0], [0.0, 1.0]] if indices == [1, 0] else [[0.0, 1.0], [1.0, 1.0]]
        assert vectors == expected
    else:
        with pytest.raises(LLMResponseError, match="do not name each of the 2 inputs exactly once"):
            client.embed(["a", "b"])


def test_non_finite_or_ragged_embeddings_are_refused(server):
    client = make_client(server, embedding_model="e")
    for data, fragment in ((
            [{"index": 0, "embedding": [1.0, "NaN"]}], "non-number or non-finite"),
            ([{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": [1.0, 2.0]}], "different lengths")):
        server.push("/v1/embeddings", ("raw", json.dumps({"data": data}).encode(), "application/json"))
        with pytest.raises(LLMResponseError, match=fragment):
            client.embed(["a"] * len(data))


def _chat_body(content, finish="stop"):
    return json.dumps({"id": "x", "model": "m", "usage": {"prompt_tokens": 1, "completion_tokens": 1},
                       "choices": [{"index": 0, "finish_reason": finish,
                                    "message": {"role": "assistant", "content": content}}]}).encode()


def test_only_complete_usable_answers_are_cached(server, tmp_path):
    cache = str(tmp_path / "c.sqlite")
    client = make_client(server, cache_path=cache)
    for content, finish in (("cut o", "length"), ("", "stop"), ("   ", "stop"), ("x", "content_filter")):
        server.push(CHAT, ("raw", _chat_body(content, finish), "application/json"))
        assert not client.chat(USER).is_complete
    assert len(server.requests) == 4  # each failure was asked again, never replayed
    first = client.chat(USER)  # the default echo: complete, so stored
    assert client.chat(USER).cached and len(server.requests) == 5
    # a caller's own test: an answer it cannot use is neither stored nor replayed
    client2 = make_client(server, cache_path=str(tmp_path / "d.sqlite"))
    server.push(CHAT, ("raw", _chat_body("<think>unfinished"), "application/json"))
    usable = lambda r: "<think>" not in r.text  # noqa: E731
    assert client2.chat(USER, cache_if=usable).text == "<think>unfinished"
    assert client2.chat(USER, cache_if=usable).text == first.text  # asked again: 7 requests
    assert len(server.requests) == 7
    assert client2.chat(USER, cache_if=usable).cached  # the usable one was stored
    # a stored record the caller refuses is a miss: the server is asked again
    assert not client2.chat(USER, cache_if=lambda r: False).cached
    assert len(server.requests) == 8


def test_truncated_record_from_an_older_cache_is_not_replayed(server, tmp_path):
    from membuilder.llm import ResponseCache

    cache_path = tmp_path / "old.sqlite"
    client = make_client(server, cache_path=str(cache_path))
    model = "test-model"
    payload = {"model": model, "messages": [dict(m) for m in USER], "extra_body": None}
    key = request_cache_key("chat", f"{server.url}/v1", payload)
    client.close()
    old = ResponseCache(cache_path)  # what an earlier version stored: a truncated answer
    old.put(key, "chat", {"text": "cut", "finish_reason": "length", "usage": [1, 1], "id": "old",
                          "model": model, "reasoning": None})
    old.close()
    client = make_client(server, cache_path=str(cache_path))
    result = client.chat(USER)
    assert not result.cached and result.text == "echo:hello|t=None" and len(server.requests) == 1


def test_one_configuration_path_and_no_key_leak(monkeypatch):
    from membuilder.embedders import OpenAIEmbedder
    from membuilder.llm import endpoint_api_key

    env = {"OPENAI_API_KEY": "sk-openai", "MEMBUILDER_EMBED_BASE_URL": "http://third-party/v1"}
    for var in ("OPENAI_BASE_URL", "MEMBUILDER_LLM_BASE_URL", "MEMBUILDER_LLM_API_KEY",
                "MEMBUILDER_EMBED_API_KEY", "OPENAI_API_KEY", "MEMBUILDER_EMBED_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = LLMConfig.from_env()
    # a separate embeddings endpoint gets no key it was not given: the fixed keyless-server key
    assert cfg.embedding_endpoint() == ("http://third-party/v1", None)
    emb = OpenAIEmbedder("e")
    assert (emb.base_url, emb._api_key) == ("http://third-party/v1", endpoint_api_key("http://third-party/v1", None))
    assert emb._api_key == "not-needed"
    # its own key goes there
    monkeypatch.setenv("MEMBUILDER_EMBED_API_KEY", "sk-emb")
    assert OpenAIEmbedder("e")._api_key == "sk-emb" == LLMConfig.from_env().embedding_endpoint()[1]
    # no separate endpoint: the chat endpoint (MEMBUILDER_LLM_BASE_URL first) with the chat key
    monkeypatch.delenv("MEMBUILDER_EMBED_BASE_URL")
    monkeypatch.delenv("MEMBUILDER_EMBED_API_KEY")
    monkeypatch.setenv("MEMBUILDER_LLM_BASE_URL", "http://chat/v1")
    emb = OpenAIEmbedder("e")
    assert (emb.base_url, emb._api_key) == LLMConfig.from_env().embedding_endpoint() == ("http://chat/v1", "sk-openai")
    # explicit arguments win and are an endpoint of their own
    emb = OpenAIEmbedder("e", base_url="http://mine/v1")
    assert (emb.base_url, emb._api_key) == ("http://mine/v1", "not-needed")


def test_lone_surrogates_never_escape_as_unicode_errors(server, tmp_path):
    from membuilder.llm import LLMInputError

    client = make_client(server, cache_path=str(tmp_path / "c.sqlite"), embedding_model="e")
    # a reply holding "\ud83d" (a JSON escape a server may send): returned as is, and cached
    # escaped (raw text made SQLite's UTF-8 encoding raise UnicodeEncodeError)
    server.push(CHAT, ("raw", _chat_body("bad \ud83d"), "application/json"))  # json.dumps escapes it
    assert client.chat(USER).text == "bad \ud83d"
    assert client.chat(USER).cached and client.chat(USER).text == "bad \ud83d"
    # a request holding one is refused before anything is sent (the HTTP library raised a bare
    # UnicodeEncodeError), also through map_chat's error slots
    sent = len(server.requests)
    bad = [{"role": "user", "content": "q \ud83d"}]
    with pytest.raises(LLMInputError, match="not valid Unicode"):
        client.chat(bad)
    out = client.map_chat([ChatRequest(messages=bad)], return_exceptions=True)
    assert isinstance(out[0], LLMInputError)
    with pytest.raises(LLMInputError):
        client.embed(["ok", "\udc00"])
    assert len(server.requests) == sent


def test_unknown_http_client_layout_is_a_config_error_not_a_silent_per_read_timeout(server, monkeypatch):
    from membuilder import llm_deadline

    class Opaque:  # an HTTP client whose pools the wrapper cannot find
        closed = False

        def close(self):
            self.closed = True

    made = []
    monkeypatch.setattr(llm_deadline.openai, "DefaultHttpxClient", lambda **kw: made.append(Opaque()) or made[-1])
    with pytest.raises(LLMConfigError, match="cannot install the whole-request deadline"):
        make_client(server).chat(USER)
    assert made[0].closed and server.requests == []
