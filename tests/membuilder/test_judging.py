"""Rule judge by hand, judge-output parsing, and the LLM judge against a local scripted server."""

import json
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from membuilder.datasets import NOT_ANSWERABLE, Question
from membuilder.judging import (
    JudgeOutputError,
    LLMJudge,
    RuleJudge,
    Verdict,
    context_contains_answer,
    is_abstention_answer,
    normalize_tokens,
    parse_judge_output,
    render_judge_prompt,
    token_f1,
)
from membuilder.llm import LLMClient, LLMConfig


class ChatServer:
    """OpenAI-compatible chat endpoint on 127.0.0.1 that replies with scripted contents.

    Each request pops the next script item: a string (the reply content), a (content,
    finish_reason) pair, or an int (an HTTP error status). With the script empty it uses `default`
    (a callable of the request body).
    """

    def __init__(self, default=None):
        self.script: deque = deque()
        self.requests: list[dict] = []
        self.default = default or (lambda body: "ok")
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                with server.lock:
                    server.requests.append(body)
                    item = server.script.popleft() if server.script else server.default(body)
                if isinstance(item, int):
                    payload, status = json.dumps({"error": {"message": f"scripted {item}"}}).encode(), item
                else:
                    status = 200
                    item, finish = item if isinstance(item, tuple) else (item, "stop")
                    payload = json.dumps({
                        "id": "x", "object": "chat.completion", "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": finish,
                                     "message": {"role": "assistant", "content": item}}],
                        "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16},
                    }).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def client(self, **overrides) -> LLMClient:
        config = LLMConfig(base_url=self.url, api_key="test", model="judge-model", max_retries=0,
                           timeout_s=10.0, **overrides)
        return LLMClient(config, sleep=lambda s: None)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = ChatServer()
    yield s
    s.close()


def q(answer="7 May 2023", *, abstention=False, qid="q1", question="When did Caroline go to the group?"):
    return Question(question_id=qid, question=question, answer=answer, category="temporal", evidence=(),
                    question_date=None, is_abstention=abstention)


# --- normalisation and the rule judge -------------------------------------------------------------


def test_normalize_tokens():
    # lower case, "&" -> and, punctuation -> space ("u.s." -> "u s", "canada's" -> "canada s"),
    # articles dropped, number words -> digits
    assert normalize_tokens("The U.S. & Canada's Three Dogs!") == ["u", "s", "and", "canada", "s", "3", "dogs"]
    assert normalize_tokens("an hour and a half") == ["hour", "and", "half"]
    assert normalize_tokens("$12, twenty-one") == ["12", "20", "1"]


def test_token_f1_by_hand():
    # common 3 of pred 4 and gold 3: P = 3/4, R = 1, F1 = 2 * 0.75 / 1.75 = 6/7
    assert token_f1(["forest", "beach", "and", "mountains"], ["beach", "mountains", "forest"]) == pytest.approx(6 / 7)
    assert token_f1(["x"], ["y"]) == 0.0


@pytest.mark.parametrize("gold,answer,expected", [
    ("7 May 2023", "She went on 7 May 2023.", True),  # containment
    ("two weeks", "For 2 weeks in Japan", True),  # number word == digit
    ("$12", "12 dollars each", True),  # "$" is punctuation
    ("The Beatles", "beatles", True),  # articles and case
    ("beach, mountains, forest", "forest, beach and mountains", True),  # F1 6/7 >= 0.5
    # gold [adoption, agencies], pred 5 tokens sharing "adoption": P 1/5, R 1/2, F1 = 0.2/0.7 = 0.29
    ("Adoption agencies", "Caroline researched adoption agency options", False),
    ("2022", "Melanie painted a lake sunrise last year", False),
    ("No", NOT_ANSWERABLE, False),  # an abstention is wrong for an answerable question
    ("7 May", "May 7", True),  # not contained, but F1 = 1 (same bag of tokens)
])
def test_rule_judge_cases(gold, answer, expected):
    verdict = RuleJudge().judge(q(gold), answer)
    assert verdict.correct is expected and verdict.error is None


def test_rule_judge_f1_threshold():
    # gold 4 tokens, answer 2 of them: P 1, R 1/2, F1 = 2/3
    judge_q = q("red blue green yellow")
    assert RuleJudge().judge(judge_q, "blue red").correct is True
    assert RuleJudge(f1_threshold=0.7).judge(judge_q, "blue red").correct is False
    with pytest.raises(ValueError):
        RuleJudge(f1_threshold=0.0)


@pytest.mark.parametrize("answer,expected", [
    (NOT_ANSWERABLE, True), ("The information is not mentioned.", True), ("I don't know.", True),
    ("Unknown", True), ("Paris", False), ("Not in Paris but in Rome", False),
])
def test_rule_judge_abstention_questions(answer, expected):
    assert is_abstention_answer(answer) is expected
    assert RuleJudge().judge(q(NOT_ANSWERABLE, abstention=True), answer).correct is expected


def test_rule_judge_unscorable_gold_is_an_error_not_wrong():
    verdict = RuleJudge().judge(q("?!"), "anything")
    assert verdict.correct is None and "no tokens" in verdict.error


def test_context_contains_answer():
    assert context_contains_answer("Core: Max\n[E1] Caroline visited the U.S. in 2021", "U.S.")
    assert not context_contains_answer("Caroline visited the US", "U.S.")  # "us" != "u s"


def test_verdict_is_either_decided_or_an_error():
    with pytest.raises(ValueError):
        Verdict(None, "")
    with pytest.raises(ValueError):
        Verdict(True, "", error="boom")


# --- parsing judge output -------------------------------------------------------------------------


def test_parse_judge_output_repairs_only_fences_and_think_blocks():
    raw = '<think>hmm {"verdict": "WRONG"}</think>```json\n{"verdict": "correct", "reason": "a {b} c"}\n```'
    assert parse_judge_output(raw) == Verdict(True, "a {b} c")
    assert parse_judge_output('x {"reason": "r", "verdict": "WRONG"} {"y": 1}') == Verdict(False, "r")


@pytest.mark.parametrize("raw,message", [
    ("CORRECT", "no JSON object"),
    ('{"verdict": "CORRECT", "reason": "cut', "ends inside the JSON object"),
    ('{"verdict": "MAYBE", "reason": "r"}', "verdict must be"),
    ('{"verdict": "CORRECT"}', "expected keys"),
    ('{"verdict": "CORRECT", "reason": "r", "score": 1}', "expected keys"),
    ('{"verdict": "CORRECT", "reason": 3}', "reason must be a string"),
    ("{'verdict': 'CORRECT'}", "no JSON object"),
    ('{"verdict": "CORRECT", "reason": "r",}', "malformed"),
])
def test_parse_judge_output_rejects(raw, message):
    with pytest.raises(JudgeOutputError, match=message):
        parse_judge_output(raw)


def test_judge_prompt_mentions_gold_and_abstention():
    user = render_judge_prompt(q("7 May 2023"), "May 7")[1]["content"]
    assert "Gold answer: 7 May 2023" in user and "Answer to grade: May 7" in user
    abstain = render_judge_prompt(q("You never said", abstention=True), "Paris")[1]["content"]
    assert "cannot be answered" in abstain and f"{NOT_ANSWERABLE} (You never said)" in abstain


# --- the LLM judge on a local server ----------------------------------------------------------------


def test_llm_judge_valid_verdicts(server):
    server.script.extend(['{"verdict": "CORRECT", "reason": "same day"}',
                          '```json\n{"verdict": "WRONG", "reason": "other day"}\n```'])
    judge = LLMJudge(server.client())
    assert judge.judge(q(), "May 7, 2023") == Verdict(True, "same day")
    assert judge.judge(q(), "8 May") == Verdict(False, "other day")
    assert len(server.requests) == 2
    sent = server.requests[0]
    assert sent["model"] == "judge-model" and sent["temperature"] == 0.0
    assert "Answer to grade: May 7, 2023" in sent["messages"][1]["content"]


def test_llm_judge_retries_malformed_then_accepts(server, tmp_path):
    server.script.extend(["I think it is right", '{"verdict": "CORRECT", "reason": "ok"}'])
    client = server.client(cache_path=str(tmp_path / "cache.sqlite"))
    assert LLMJudge(client, max_retries=2).judge(q(), "7 May 2023") == Verdict(True, "ok")
    assert len(server.requests) == 2  # the retry was not answered from the cache
    usage = client.usage()
    assert (usage.prompt_tokens, usage.completion_tokens) == (22, 10)


def test_llm_judge_always_malformed_is_an_error_not_wrong(server):
    server.default = lambda body: "CORRECT!"
    verdict = LLMJudge(server.client(), max_retries=2).judge(q(), "7 May 2023")
    assert verdict.correct is None
    assert verdict.error.startswith("unparseable judge output") and "attempt 3" in verdict.error
    assert len(server.requests) == 3  # 1 + max_retries


def test_llm_judge_server_failure_is_an_error_not_wrong(server):
    server.default = lambda body: 500
    verdict = LLMJudge(server.client()).judge(q(), "7 May 2023")
    assert verdict.correct is None and verdict.error.startswith("judge call failed")


# --- hostile judge output (issue 11, items 8, 9, 12) ------------------------------------------------


def test_parse_judge_output_huge_integer_and_think_blocks():
    # a >4,300-digit integer made json.loads raise ValueError straight out of the judge parser
    with pytest.raises(JudgeOutputError, match="malformed"):
        parse_judge_output('{"verdict": "CORRECT", "reason": %s}' % ("9" * 5000))
    # the shared think rules: an orphan </think> ends the thinking, an unclosed <think> hides the rest
    assert parse_judge_output('{"verdict": "WRONG", "reason": "x"}</think>{"verdict": "CORRECT", "reason": "y"}') \
        == Verdict(True, "y")
    with pytest.raises(JudgeOutputError, match="unterminated <think>"):
        parse_judge_output('<think>{"verdict": "CORRECT", "reason": "y"}')
    with pytest.raises(JudgeOutputError) as info:
        parse_judge_output('{"verdict": "%s", "reason": "r"}' % ("Z" * 50_000))
    assert len(str(info.value)) < 200  # a bounded excerpt, not the whole verdict
    with pytest.raises(JudgeOutputError, match="reason is not valid Unicode"):
        parse_judge_output('{"verdict": "CORRECT", "reason": "same \\ud83d"}')


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec=None), max_size=60)
       | st.text(alphabet='{}[]":,0123456789e.-<think>/ verdictCORRECTreason\\u', max_size=80))
def test_parse_judge_output_raises_only_its_own_error(raw):
    try:
        verdict = parse_judge_output(raw)
    except JudgeOutputError:
        return
    assert verdict.correct in (True, False)


def test_llm_judge_never_caches_an_unparseable_verdict(server, tmp_path):
    from membuilder.llm import ResponseCache

    cache = tmp_path / "cache.sqlite"
    server.script.extend(["CORRECT!", '{"verdict": "CORRECT", "reason": "ok"}'])
    client = server.client(cache_path=str(cache))
    assert LLMJudge(client, max_retries=1).judge(q(), "7 May 2023") == Verdict(True, "ok")
    client.close()
    stored = ResponseCache(cache)
    assert len(stored) == 0  # the unparseable first reply was not stored (the retry bypasses the cache)
    stored.close()
    # a rerun asks the server again for the first attempt instead of replaying "CORRECT!"
    server.script.append('{"verdict": "WRONG", "reason": "fresh"}')
    client = server.client(cache_path=str(cache))
    assert LLMJudge(client, max_retries=1).judge(q(), "7 May 2023") == Verdict(False, "fresh")
    assert client.usage().cache_hits == 0 and len(server.requests) == 3
    assert LLMJudge(client, max_retries=1).judge(q(), "7 May 2023") == Verdict(False, "fresh")
    assert client.usage().cache_hits == 1 and len(server.requests) == 3  # a good verdict is cached
