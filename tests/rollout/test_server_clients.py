"""The rollout server's command line model names and its handling of clients that disconnect
(server in this process, transformers backend)."""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import time
import urllib.request

import pytest

from rollout.hf_engine import HFEngine
from rollout.server import RolloutServer, build_engine, model_path


def _args(**kw) -> argparse.Namespace:
    base = dict(
        backend="hf", dtype="float32", device="cpu", max_batch_size=8, max_model_len=None, gguf_file=None,
        chat_template_kwargs=None,
    )
    return argparse.Namespace(**{**base, **kw})


def test_model_name_resolves_through_the_model_cache(tiny_dir, tmp_path, monkeypatch):
    # A cache that already holds the converted folder: `smollm2` resolves to it without converting.
    monkeypatch.setenv("MEMBUILDER_CACHE", str(tmp_path))
    shutil.copytree(tiny_dir, tmp_path / "models" / "smollm2-135m-instruct")
    assert model_path("smollm2") == str(tmp_path / "models" / "smollm2-135m-instruct")
    engine = build_engine(_args(model="smollm2"))
    assert engine.vocab_size == 1024  # the tiny policy's vocabulary, loaded from the cache
    with pytest.raises(SystemExit, match="--model: model 'no-such-model' is neither a known name"):
        build_engine(_args(model="no-such-model"))


def _health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=30) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
def test_generation_stops_when_its_client_disconnects(tiny_dir):
    engine = HFEngine(tiny_dir)
    server = RolloutServer(engine, model_name="tiny", backend="hf", port=0).start()
    try:
        host, port = server.url.removeprefix("http://").split(":")
        body = json.dumps({
            "model": "tiny", "prompts": [[5, 17, 300, 42]],
            "params": {"max_tokens": 4000, "ignore_eos": True, "seed": 1},
        }).encode()  # fmt: skip
        sock = socket.create_connection((host, int(port)))
        sock.sendall(
            b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        deadline = time.monotonic() + 60
        while _health(server.url)["running"] == 0:  # wait until the engine call has started
            assert time.monotonic() < deadline, "the request never reached the engine"
            time.sleep(0.05)
        sock.close()  # the client gives up
        while _health(server.url)["running"] != 0:
            assert time.monotonic() < deadline + 120, "the engine call went on after its client left"
            time.sleep(0.05)
        # The call was cancelled: it stopped well before its 4,000 decode steps (one per token).
        assert engine.progress < 4000
        # ... and the server goes on serving.
        req = urllib.request.Request(
            server.url + "/v1/generate", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"model": "tiny", "prompts": ["hi"], "params": {"max_tokens": 3, "seed": 0}}).encode(),
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            out = json.loads(resp.read())
        assert len(out["completions"][0][0]["token_ids"]) == 3
    finally:
        server.shutdown(grace_s=5)
