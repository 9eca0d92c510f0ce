"""`RemoteEngine` sends its chat-template variables with every generate request."""

from __future__ import annotations

from rollout.client import RemoteEngine
from rollout.types import SamplingParams


def _capturing(engine: RemoteEngine) -> list[dict]:
    sent: list[dict] = []

    def request(method, path, body=None):
        sent.append(body)
        return {"completions": [[]]}

    engine.request = request
    return sent


def test_chat_template_kwargs_go_with_every_request():
    engine = RemoteEngine("http://127.0.0.1:9", model="policy", chat_template_kwargs={"enable_thinking": False})
    sent = _capturing(engine)
    assert engine.generate([[{"role": "user", "content": "hi"}]], SamplingParams(n=1, max_tokens=2)) == [[]]
    assert sent[0]["chat_template_kwargs"] == {"enable_thinking": False}


def test_no_chat_template_kwargs_leaves_the_servers_defaults():
    engine = RemoteEngine("http://127.0.0.1:9", model="policy")
    sent = _capturing(engine)
    engine.generate(["hi"], SamplingParams(n=1, max_tokens=2))
    assert "chat_template_kwargs" not in sent[0]
