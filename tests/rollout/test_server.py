"""Rollout server (transformers backend) in its own process; this process is the trainer.

Weights cross the process boundary over a gloo group. Tests that check numbers push the weights
they check against first, so they do not depend on their order.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from rollout.chat import render_prompt
from rollout.client import RemoteEngine
from rollout.types import SamplingParams, WeightSyncError
from tests.rollout.conftest import PROMPTS, forward_logprobs, greedy_reference, load_tokenizer
from tests.rollout.gloo_peer import perturbed_model

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w")
    cmd = [sys.executable, "-m", "rollout.server", "--model", str(tiny_dir), "--backend", "hf", "--port", "0"]
    proc = subprocess.Popen(
        cmd + ["--served-model-name", "tiny"], cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        line = lines.get(timeout=180)
        assert "listening on" in line, line
        yield line.split()[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


@pytest.fixture(scope="module")
def client(server):
    c = RemoteEngine(server)
    c.connect_weights(timeout_s=120)
    yield c
    c.close()


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return load_tokenizer(tiny_dir)


def post(url: str, path: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def chat(url: str, content: str, **extra) -> tuple[int, dict]:
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra}
    return post(url, "/v1/chat/completions", body)


def test_health_and_models(server):
    with urllib.request.urlopen(server + "/health") as resp:
        health = json.loads(resp.read())
    assert health["status"] == "ok" and health["model"] == "tiny" and health["backend"] == "hf"
    with urllib.request.urlopen(server + "/v1/models") as resp:
        assert [m["id"] for m in json.loads(resp.read())["data"]] == ["tiny"]


def test_chat_completion_logprobs_match_a_forward_pass(server, client, original, tok):
    client.update_weights(original.named_parameters())
    status, out = chat(server, "Hello Mel", n=2, seed=3, logprobs=True, return_token_ids=True)
    assert status == 200 and out["object"] == "chat.completion" and len(out["choices"]) == 2
    prompt = render_prompt(tok, [{"role": "user", "content": "Hello Mel"}])
    assert out["prompt_token_ids"] == prompt and out["usage"]["prompt_tokens"] == len(prompt)
    for choice in out["choices"]:
        lps = [t["logprob"] for t in choice["logprobs"]["content"]]
        torch.testing.assert_close(
            torch.tensor(lps), forward_logprobs(original, prompt, choice["token_ids"]), atol=1e-5, rtol=0
        )
        assert choice["message"]["content"] == tok.decode(choice["token_ids"], skip_special_tokens=True)


def test_completions_with_several_prompts(server, client, original, tok):
    client.update_weights(original.named_parameters())
    status, out = post(
        server,
        "/v1/completions",
        {
            "model": "tiny",
            "prompt": ["Caroline went", [5, 6, 7]],
            "n": 2,
            "max_tokens": 5,
            "logprobs": 0,
            "return_token_ids": True,
        },
    )
    assert status == 200 and [c["index"] for c in out["choices"]] == [0, 1, 2, 3]  # prompt i, sample j -> i * n + j
    assert [c["prompt_token_ids"] for c in out["choices"]] == [tok("Caroline went")["input_ids"]] * 2 + [[5, 6, 7]] * 2
    for c in out["choices"]:
        assert len(c["logprobs"]["token_logprobs"]) == len(c["token_ids"]) == len(c["logprobs"]["text_offset"])
        torch.testing.assert_close(
            torch.tensor(c["logprobs"]["token_logprobs"]),
            forward_logprobs(original, c["prompt_token_ids"], c["token_ids"]),
            atol=1e-5,
            rtol=0,
        )


def test_openai_client_talks_to_the_server(server, client, original):
    from openai import OpenAI

    client.update_weights(original.named_parameters())
    api = OpenAI(base_url=server + "/v1", api_key="unused")
    reply = api.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0, logprobs=True
    )
    (mine,) = client.generate([[{"role": "user", "content": "hi"}]], SamplingParams(temperature=0, max_tokens=6))[0]
    assert reply.choices[0].message.content == mine.text
    assert [t.logprob for t in reply.choices[0].logprobs.content] == list(mine.logprobs)


CHAT = "/v1/chat/completions"
ASK = {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        (CHAT, b'{"model": "tiny", "messages": [', 400, "not valid JSON"),
        (CHAT, b"[1, 2]", 400, "must be a JSON object"),
        (CHAT, {**ASK, "model": "gpt-4"}, 404, "'gpt-4' does not exist"),
        (CHAT, {**ASK, "n": 0}, 400, "n must be an integer >= 1"),
        (CHAT, {**ASK, "n": -3}, 400, "n must be an integer >= 1"),
        (CHAT, {**ASK, "max_tokens": "5"}, 400, "max_tokens"),
        (CHAT, {**ASK, "stream": True}, 400, "stream"),
        (CHAT, {**ASK, "messages": []}, 400, "messages must be a non-empty list"),
        (CHAT, {**ASK, "messages": [{"role": "user"}]}, 400, "message 0 needs"),
        (
            "/v1/completions",
            {**ASK, "prompt": [5] * 4090, "max_tokens": 10},
            400,
            "exceeds the model's context of 4096",
        ),
        ("/v1/completions", {**ASK, "prompt": [5, 70000], "max_tokens": 2}, 400, "token ids must lie in"),
        ("/v1/completions", {**ASK, "prompt": "x", "n": 5000, "max_tokens": 1}, 400, "over 4096 sequences"),
        ("/v1/embeddings", {"model": "tiny", "input": "x"}, 404, "no route"),
        (
            "/v1/weights/update",
            {"tensors": [{"name": "x", "shape": [2], "dtype": "float32"}]},
            400,
            "unknown weight name",
        ),
        ("/v1/weights/init", {"host": "127.0.0.1", "port": 1, "rank": 0}, 400, "rank must lie in"),
    ],
)
def test_bad_requests_get_clear_errors(server, path, body, status, message):
    got_status, out = post(server, path, body)
    assert got_status == status and message in out["error"]["message"], out
    assert chat(server, "still alive?")[0] == 200


def test_32_concurrent_requests_are_all_answered(server, client, original, tok):
    client.update_weights(original.named_parameters())
    results: dict[int, tuple[int, dict]] = {}

    def ask(i: int) -> None:
        results[i] = chat(server, f"question {i}", temperature=0, logprobs=True, return_token_ids=True)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(results) == list(range(32)) and all(status == 200 for status, _ in results.values())
    for i, (_, out) in results.items():
        prompt = render_prompt(tok, [{"role": "user", "content": f"question {i}"}])
        tokens, lps = greedy_reference(original, prompt, 8, {tok.eos_token_id})
        (choice,) = out["choices"]
        assert out["prompt_token_ids"] == prompt and choice["token_ids"] == tokens  # each answer is its own prompt's
        torch.testing.assert_close(
            torch.tensor([t["logprob"] for t in choice["logprobs"]["content"]]), torch.tensor(lps), atol=1e-4, rtol=0
        )


def test_weight_push_over_gloo_is_exact(server, client, original, tok, tiny_dir):
    client.update_weights(original.named_parameters())
    pushed = perturbed_model(str(tiny_dir), seed=1)
    prompt = render_prompt(tok, PROMPTS[0])
    params = SamplingParams(temperature=0, max_tokens=10)
    (before,) = client.generate([PROMPTS[0]], params)[0]
    assert (forward_logprobs(pushed, prompt, before.token_ids) - torch.tensor(before.logprobs)).abs().max() > 1e-3
    client.update_weights(pushed.named_parameters(), bucket_bytes=2**16)  # many buckets
    (after,) = client.generate([PROMPTS[0]], params)[0]
    tokens, lps = greedy_reference(pushed, prompt, 10, {tok.eos_token_id})
    assert list(after.token_ids) == tokens
    torch.testing.assert_close(torch.tensor(after.logprobs), torch.tensor(lps), atol=1e-5, rtol=0)


def test_lora_push_streams_merged_weights_over_gloo(server, client, tiny_dir, tok):
    from rollout.lora import policy_weights
    from tests.rollout.test_lora import lora_policy

    policy = lora_policy(tiny_dir)
    client.update_weights(policy_weights(policy), bucket_bytes=2**16)  # announced from metadata, merged per bucket
    prompt = render_prompt(tok, PROMPTS[0])
    (c,) = client.generate([PROMPTS[0]], SamplingParams(max_tokens=8, seed=4))[0]
    ref = forward_logprobs(policy, prompt, c.token_ids)  # the adapted policy itself
    torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-5, rtol=0)


def test_bad_push_is_refused_before_any_tensor_moves(server, client, original, tiny_dir):
    client.update_weights(original.named_parameters())
    version = client.request("GET", "/v1/weights")["version"]
    params = SamplingParams(temperature=0, max_tokens=8)
    before = client.generate(PROMPTS, params)
    named = list(perturbed_model(str(tiny_dir), seed=2).named_parameters())
    with pytest.raises(
        WeightSyncError, match=r"weight 'model.norm.weight' has shape \(127,\), the model expects \(128,\)"
    ):
        client.update_weights([(n, t[:-1] if n == "model.norm.weight" else t) for n, t in named])
    with pytest.raises(WeightSyncError, match="unknown weight name 'model.layers.0.mlp.gate_up_proj.weight'"):
        client.update_weights(
            [("model.layers.0.mlp.gate_up_proj.weight" if "gate_proj" in n else n, t) for n, t in named]
        )
    state = client.request("GET", "/v1/weights")
    assert (state["version"], state["last_error"], state["connected"]) == (version, None, True)
    assert [[c.token_ids for c in s] for s in client.generate(PROMPTS, params)] == [
        [c.token_ids for c in s] for s in before
    ]


def _classify(tokens: list[int], lps: list[float], refs: dict[str, tuple[list[int], list[float]]]) -> str | None:
    """Which weights produced this greedy answer: all tokens and all log-probs must match one reference."""
    for label, (ref_tokens, ref_lps) in refs.items():
        if tokens == ref_tokens and all(abs(a - b) <= 1e-4 for a, b in zip(lps, ref_lps, strict=True)):
            return label
    return None


def test_weight_update_during_traffic_never_mixes_weights(server, client, original, tok, tiny_dir):
    new = perturbed_model(str(tiny_dir), seed=3)
    contents = [f"traffic {i}" for i in range(4)]
    prompts = [render_prompt(tok, [{"role": "user", "content": c}]) for c in contents]
    eos = {tok.eos_token_id}
    refs = [{"old": greedy_reference(original, p, 8, eos), "new": greedy_reference(new, p, 8, eos)} for p in prompts]
    # The check has power: every token's log-prob differs between the weights by far more than the
    # tolerance, along both greedy paths, so an answer switching weights at any token matches neither.
    for p, r in zip(prompts, refs, strict=True):
        for path, other in (("old", new), ("new", original)):
            assert (forward_logprobs(other, p, r[path][0]) - torch.tensor(r[path][1])).abs().min() > 1e-3
    old_tokens, old_lps = refs[0]["old"]
    mixed = old_lps[:4] + forward_logprobs(new, prompts[0], old_tokens)[4:].tolist()
    assert _classify(old_tokens, mixed, refs[0]) is None  # a made-up mix is caught

    client.update_weights(original.named_parameters())
    phase = {"now": 0}  # 0 before the push, 1 while it runs, 2 after it returned
    answers: list[tuple[int, int, int, int, dict]] = []  # (prompt, phase sent, phase done, status, body)
    progress = threading.Condition()
    stop = threading.Event()

    def traffic(i: int) -> None:
        while not stop.is_set():
            sent = phase["now"]
            status, out = chat(server, contents[i], temperature=0, logprobs=True, return_token_ids=True)
            with progress:
                answers.append((i, sent, phase["now"], status, out))
                progress.notify_all()

    def count(pred) -> int:
        return sum(1 for a in answers if pred(a))

    workers = [threading.Thread(target=traffic, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    with progress:
        assert progress.wait_for(lambda: count(lambda a: a[2] == 0) >= 8, timeout=300)
    phase["now"] = 1
    client.update_weights(new.named_parameters())
    phase["now"] = 2
    with progress:
        assert progress.wait_for(lambda: count(lambda a: a[1] == 2) >= 8, timeout=300)
    stop.set()
    for w in workers:
        w.join(timeout=300)

    assert all(status == 200 for _, _, _, status, _ in answers)
    labels = []
    for i, sent, done, _, out in answers:
        choice = out["choices"][0]
        label = _classify(choice["token_ids"], [t["logprob"] for t in choice["logprobs"]["content"]], refs[i])
        assert label is not None, f"prompt {i}: an answer matches neither the old nor the new weights"
        assert not (done == 0 and label != "old") and not (sent == 2 and label != "new")
        labels.append(label)
    assert "old" in labels and "new" in labels


def test_api_key_is_required_when_set(tiny_dir):
    from rollout.hf_engine import HFEngine
    from rollout.server import RolloutServer

    server = RolloutServer(HFEngine(tiny_dir), model_name="tiny", backend="hf", port=0, api_key="sesame").start()
    try:
        body = json.dumps({"model": "tiny", "prompt": [5, 6], "max_tokens": 2}).encode()
        for headers, status in (
            ({}, 401),
            ({"Authorization": "Bearer wrong"}, 401),
            ({"Authorization": "Bearer sesame"}, 200),
        ):
            req = urllib.request.Request(server.url + "/v1/completions", data=body, method="POST", headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    assert resp.status == status
            except urllib.error.HTTPError as e:
                assert e.code == status and "API key" in json.loads(e.read())["error"]["message"]
        with urllib.request.urlopen(server.url + "/health", timeout=60) as resp:  # health stays open
            assert resp.status == 200
    finally:
        server.shutdown()
