"""The rollout server's edges, in this process (transformers engine on the tiny policy): HTTP input
it must refuse early, weight pushes that never arrive, a stalled engine, sleep / wake, versions."""

from __future__ import annotations

import datetime
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch.distributed as dist

from rollout.client import RemoteEngine
from rollout.hf_engine import HFEngine
from rollout.server import RolloutServer
from rollout.types import SamplingParams, WeightSyncError
from rollout.weight_sync import tensor_metas
from tests.rollout.conftest import PROMPTS, load_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hf(tiny_dir):
    return HFEngine(tiny_dir)


def serve(engine, **kwargs) -> RolloutServer:
    return RolloutServer(engine, model_name="tiny", backend="hf", port=0, **kwargs).start()


@pytest.fixture(scope="module")
def server(hf):
    s = serve(hf, api_key="sesame", request_timeout_s=2)
    yield s
    s.shutdown(grace_s=5)


def call(url: str, path: str, body=None, key: str | None = "sesame", method: str | None = None) -> tuple[int, dict]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url + path, data=data, method=method or ("POST" if data else "GET"), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def raw_exchange(url: str, request: bytes) -> bytes:
    """Send raw bytes and read what comes back until the server closes (30 s at most)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


ASK = {"model": "tiny", "prompt": [5, 6, 7]}


@pytest.mark.parametrize(
    "body, message",
    [
        ({**ASK, "ignore_eos": "false"}, "ignore_eos must be true or false"),
        ({**ASK, "return_token_ids": "yes"}, "return_token_ids must be true or false"),
        ({**ASK, "seed": 2**64}, "seed must lie in"),
        ({**ASK, "logprobs": True}, "logprobs must be a non-negative integer"),
    ],
)
def test_strict_fields(server, body, message):
    status, out = call(server.url, "/v1/completions", body)
    assert status == 400 and message in out["error"]["message"], out


def test_null_max_completion_tokens_does_not_hide_max_tokens(server):
    body = {**ASK, "max_completion_tokens": None, "max_tokens": 3, "ignore_eos": True, "return_token_ids": True}
    status, out = call(server.url, "/v1/completions", body)
    assert status == 200 and len(out["choices"][0]["token_ids"]) == 3


def test_deep_json_nesting_is_a_bad_request(server):
    for raw in (b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b'{"x": ' + b"[" * 40 + b"]" * 40 + b"}"):
        status, out = call(server.url, "/v1/completions", raw)
        assert status == 400 and "nests JSON deeper than 32" in out["error"]["message"]


def test_huge_text_prompt_is_refused_by_its_length(server, hf):
    text = "a" * (hf.max_model_len * max(len(t) for t in hf.tokenizer.get_vocab()) + 1)
    status, out = call(server.url, "/v1/completions", {"model": "tiny", "prompt": text, "max_tokens": 1})
    assert status == 400 and f"the prompt has {len(text)} characters" in out["error"]["message"]


def test_a_body_shorter_than_announced_times_out(server):
    reply = raw_exchange(
        server.url,
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sesame\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":",
    )
    assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 2" in reply


def test_wrong_key_is_refused_before_the_body_is_read(server, monkeypatch):
    import rollout.http_front as front

    compared = []
    real = front.hmac.compare_digest
    monkeypatch.setattr(front.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    # 10 MB announced, none sent: the answer must come from the headers alone.
    reply = raw_exchange(
        server.url,
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
        b"Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 401") and b"Connection: close" in reply
    assert compared == [(b"Bearer wrong", b"Bearer sesame")]  # the constant-time comparison decided
    assert call(server.url, "/health", key=None)[0] == 200  # health stays open


def test_weights_init_bounds_its_timeout_and_admits_one_join_at_a_time(server):
    from rollout.client import _free_port

    status, out = call(server.url, "/v1/weights/init", {"host": "127.0.0.1", "port": 1, "timeout_s": 1e9})
    assert status == 400 and "timeout_s must lie in (0, 600]" in out["error"]["message"]
    port = _free_port("127.0.0.1")
    # This test is rank 0: it hosts the group's store now but joins the group only later, so the
    # first init waits inside the join meanwhile.
    store = dist.TCPStore("127.0.0.1", port, 2, True, timeout=datetime.timedelta(seconds=120), wait_for_workers=False)
    first: dict = {}
    join = {"host": "127.0.0.1", "port": port, "timeout_s": 120}
    waiter = threading.Thread(target=lambda: first.update(r=call(server.url, "/v1/weights/init", join)))
    waiter.start()
    for _ in range(6000):  # until the server is inside the join (10 ms polls, 60 s at most)
        if server._joining:
            break
        time.sleep(0.01)
    assert server._joining
    status, out = call(server.url, "/v1/weights/init", join)
    assert status == 409 and "another weights/init" in out["error"]["message"]
    group = dist.ProcessGroupGloo(store, 0, 2, datetime.timedelta(seconds=120))
    waiter.join(timeout=120)
    assert first["r"][0] == 200 and call(server.url, "/v1/weights")[1]["connected"]
    assert call(server.url, "/v1/weights/close", {})[0] == 200
    del group, store


@pytest.fixture(scope="module")
def original_named(tiny_dir):
    return list(load_model(tiny_dir).named_parameters())


def test_an_announced_push_that_is_sent_late_blocks_no_generation(hf, original_named):
    server = serve(hf, weight_timeout_s=120)
    try:
        client = RemoteEngine(server.url)
        client.connect_weights(timeout_s=60)
        version = client.weight_version
        announce = {"tensors": [m.to_json() for m in tensor_metas(original_named)], "version": version + 5}
        push_id = client.request("POST", "/v1/weights/update", announce)["push_id"]
        # Before the fix the scheduler waited inside the receive here, and this call hung with it.
        (c,) = client.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=3))[0]
        assert c.weight_version == version and client.request("GET", "/v1/weights")["pending"]
        client._transport.send(original_named, 256 * 2**20)
        assert client._wait_push(push_id)["ok"]
        (c,) = client.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=3))[0]
        assert c.weight_version == version + 5
        client.close()
    finally:
        server.shutdown(grace_s=5)


def test_a_push_that_never_comes_breaks_the_group_and_the_client_rebuilds_it(hf, original_named):
    server = serve(hf, weight_timeout_s=1)
    try:
        client = RemoteEngine(server.url)
        client.connect_weights(timeout_s=60)
        announce = {"tensors": [m.to_json() for m in tensor_metas(original_named)]}
        push_id = client.request("POST", "/v1/weights/update", announce)["push_id"]
        push = client._wait_push(push_id)  # nothing is sent: the server gives up after 1 s
        state = client.request("GET", "/v1/weights")
        assert push["broken"] and not push["ok"] and "Timed out" in push["error"]
        assert not state["connected"] and state["broken"] and not state["pending"]
        with pytest.raises(WeightSyncError, match="the weight-sync group was rebuilt: push again"):
            client.update_weights(original_named)
        assert client.request("GET", "/v1/weights")["connected"]
        client.update_weights(original_named, version=42)  # the rebuilt group carries the next push
        assert client.weight_version == 42
        assert client.generate([PROMPTS[1]], SamplingParams(max_tokens=2))[0][0].weight_version == 42
        client.close()
    finally:
        server.shutdown(grace_s=5)


class _BlockingEngine:
    """The tiny transformers engine, but each generate call waits for `release` without stepping."""

    def __init__(self, engine: HFEngine):
        self.engine, self.release, self.entered = engine, threading.Event(), threading.Event()
        self.progress = 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, prompts, params):
        self.entered.set()
        self.release.wait()
        return self.engine.generate(prompts, params)


def test_health_reports_an_engine_that_makes_no_progress(hf):
    engine = _BlockingEngine(hf)
    server = serve(engine, stall_timeout_s=0)  # any time without a step counts as a stall
    try:
        first: dict = {}
        body = {"model": "tiny", "prompt": [5, 6], "max_tokens": 2}
        waiter = threading.Thread(target=lambda: first.update(r=call(server.url, "/v1/completions", body, key=None)))
        waiter.start()
        assert engine.entered.wait(timeout=60)
        status, health = call(server.url, "/health", key=None)
        assert status == 503 and health["status"] == "stalled" and health["running"] == 1
        status, out = call(server.url, "/v1/completions", body, key=None)
        assert status == 503 and "no progress" in out["error"]["message"]
        engine.release.set()
        waiter.join(timeout=60)
        assert first["r"][0] == 200
        status, health = call(server.url, "/health", key=None)
        assert status == 200 and health["status"] == "ok"
    finally:
        engine.release.set()
        server.shutdown(grace_s=5)


def test_sleep_and_wake_over_http(tiny_dir):
    server = serve(HFEngine(tiny_dir))
    try:
        client = RemoteEngine(server.url)
        params = SamplingParams(temperature=0, max_tokens=3)
        before = client.generate(PROMPTS[:2], params)
        client.sleep(level=1)
        assert call(server.url, "/health", key=None)[1]["status"] == "asleep"
        status, out = call(server.url, "/v1/completions", {**ASK, "max_tokens": 2}, key=None)
        assert status == 503 and "asleep" in out["error"]["message"]
        client.wake_up()
        assert [[c.token_ids for c in s] for s in client.generate(PROMPTS[:2], params)] == [
            [c.token_ids for c in s] for s in before
        ]
    finally:
        server.shutdown(grace_s=5)


def test_one_request_per_generate_call_with_per_prompt_params(hf):
    server = serve(hf)
    try:
        client = RemoteEngine(server.url)
        params = [SamplingParams(temperature=0, max_tokens=2), SamplingParams(temperature=0, max_tokens=6)] * 2
        remote = client.generate(PROMPTS, params)
        local = hf.generate(PROMPTS, params)
        assert [[(c.token_ids, c.text) for c in s] for s in remote] == [[(c.token_ids, c.text) for c in s] for s in local]
        assert [s[0].weight_version for s in remote] == [hf.weight_version] * 4
        for r, loc in zip(remote, local, strict=True):
            assert r[0].logprobs == pytest.approx(loc[0].logprobs, abs=1e-6)
    finally:
        server.shutdown(grace_s=5)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_answers_every_request_and_the_server_exits_cleanly(tiny_dir, tmp_path, sig):
    cmd = [sys.executable, "-m", "rollout.server", "--model", str(tiny_dir), "--port", "0"]
    cmd += ["--served-model-name", "tiny", "--shutdown-grace-s", "0.5"]
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening on" in line, (tmp_path / "server.log").read_text()
        url = line.split()[-1]
        answers: dict[int, object] = {}

        def ask(i: int, max_tokens: int) -> None:
            body = {"model": "tiny", "prompt": [5, 6, i], "max_tokens": max_tokens, "ignore_eos": True}
            try:
                answers[i] = call(url, "/v1/completions", body, key=None)[0]
            except OSError as e:  # a connection reset: what SIGTERM did before
                answers[i] = repr(e)

        def wait_health(pred) -> None:
            for _ in range(6000):  # 10 ms polls, 60 s at most
                if pred(call(url, "/health", key=None)[1]):
                    return
                time.sleep(0.01)
            raise AssertionError("the server never reached the expected state")

        threads = [threading.Thread(target=ask, args=(0, 4000))]  # long: in the engine when the signal comes
        threads[0].start()
        wait_health(lambda h: h["running"] == 1)
        threads += [threading.Thread(target=ask, args=(i, 2)) for i in (1, 2, 3)]  # queued behind it
        for t in threads[1:]:
            t.start()
        wait_health(lambda h: h["queued"] == 3)
        proc.send_signal(sig)
        for t in threads:
            t.join(timeout=120)
        assert proc.wait(timeout=120) == 0, (tmp_path / "server.log").read_text()
        assert answers[0] in (200, 503) and [answers[i] for i in (1, 2, 3)] == [503, 503, 503], answers
        with pytest.raises(OSError):  # no longer accepting
            call(url, "/health", key=None)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
