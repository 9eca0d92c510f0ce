"""The reward with API models: LLMAnswerer and LLMJudge through LLMClient on a local fake
OpenAI-compatible server, called concurrently with a per-call time limit."""

import json
import re

import pytest

from membuilder.answering import LLMAnswerer
from membuilder.judging import LLMJudge
from reward import RewardConfig, score_session
from reward.score import BaseCache
from tests.membuilder.test_judging import ChatServer

from .helpers import BIKE, outputs, put_state, request, words


def reply(body):
    system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
    if system.startswith("You grade answers"):
        gold = re.search(r"Gold answer: (.*)", user).group(1)
        answer = re.search(r"Answer to grade: (.*)", user).group(1)
        verdict = "CORRECT" if gold.lower() in answer.lower() else "WRONG"
        return json.dumps({"verdict": verdict, "reason": "compared"})
    if "Which city" in user:
        return "Paris" if "Paris" in user else "Not answerable"
    if "FAIL" in user:
        return 500
    return "Rocket" if "Rocket" in user else "Not answerable"


@pytest.fixture
def server():
    s = ChatServer(default=reply)
    yield s
    s.close()


def test_api_answerer_and_judge_concurrently(server, tmp_path):
    store, sid = put_state(tmp_path)
    client = server.client()
    cfg = RewardConfig(workers=4, call_timeout_s=5.0)
    [r] = score_session([request(sid, [outputs(semantic=BIKE), outputs()])], snapshots=store, token_counter=words,
                        answerer=LLMAnswerer(client), judge=LLMJudge(client), config=cfg, cache=BaseCache())
    assert r.task_rewards == (1.0, 0.5)
    answer_prompts = [b["messages"][-1]["content"] for b in server.requests
                      if not b["messages"][0]["content"].startswith("You grade")]
    # 2 candidates x 2 questions, each with the question's own date
    assert len(answer_prompts) == 4 and all("Current date: 8 May 2023\n" in p for p in answer_prompts)


def test_an_api_failure_masks_never_scores_zero(server, tmp_path):
    store, sid = put_state(tmp_path)
    fail = '{"operations": [{"action": "ADD", "memory": "FAIL marker: Ann named her new bike Rocket."}]}'
    [r] = score_session([request(sid, [outputs(semantic=fail), outputs()])], snapshots=store, token_counter=words,
                        answerer=LLMAnswerer(server.client()), judge=LLMJudge(server.client()),
                        config=RewardConfig(workers=2), cache=BaseCache())
    # the bike question's answer call got HTTP 500 (the city question was answered): T(0) unknown
    assert all(s.masked and s.mask_reason.startswith("1 of 2 questions could not be scored; first: "
                                                     "LLMRetriesExhausted") and "HTTP 500" in s.mask_reason
               for s in r.samples if s.index == 0)
    assert r.task_rewards[0] is None and r.task_rewards[1] == 0.5
