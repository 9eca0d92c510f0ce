"""The answer / judge call runner: batches, concurrency, per-call time limit, deduplication."""

import threading

from membuilder.answering import ExtractiveAnswerer
from membuilder.judging import RuleJudge
from reward import RewardConfig, score_session
from reward.score import BaseCache
from reward.task import CallFailure, qa_question, run_calls
from reward.types import QAPair

from .helpers import BIKE, outputs, put_state, request, words


def test_batches_workers_and_failures():
    cfg = RewardConfig(batch_size=3)
    calls = []

    def batch(chunk):
        calls.append(list(chunk))
        if 6 in chunk:
            raise RuntimeError("model OOM")
        return [x * 10 for x in chunk]

    out = run_calls(None, batch, list(range(8)), cfg)
    # chunks [0 1 2] [3 4 5] [6 7]; the third fails as a whole
    assert calls == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert out[:6] == [0, 10, 20, 30, 40, 50]
    assert out[6] == out[7] == CallFailure("RuntimeError: model OOM")
    wrong = run_calls(None, lambda chunk: chunk[:1], [1, 2], cfg)
    assert all(isinstance(x, CallFailure) and "wrong length" in x.reason for x in wrong)


def test_concurrent_calls_run_together_and_time_out_one_by_one():
    barrier = threading.Barrier(4, timeout=10)
    release = threading.Event()

    def single(x):
        barrier.wait()  # passes only if four calls are in flight at once
        if x == 3:
            release.wait(10)
        return x + 1

    out = run_calls(single, None, [0, 1, 2, 3], RewardConfig(workers=4, call_timeout_s=0.3))
    release.set()
    # the stuck call was abandoned (had it been waited for, it would have returned 4)
    assert out[:3] == [1, 2, 3] and out[3] == CallFailure("no answer within call_timeout_s=0.3")


class CountingBatchAnswerer(ExtractiveAnswerer):
    def __init__(self):
        super().__init__()
        self.batches = []

    def answer_batch(self, questions, contexts):
        self.batches.append(len(questions))
        return [self.answer(q, c) for q, c in zip(questions, contexts)]


class CountingJudge(RuleJudge):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def judge(self, question, answer):
        self.calls += 1
        return super().judge(question, answer)


def test_identical_candidates_are_answered_and_judged_once(tmp_path):
    store, sid = put_state(tmp_path)
    answerer, judge = CountingBatchAnswerer(), CountingJudge()
    cands = [outputs(semantic=BIKE), outputs(), outputs(semantic=BIKE), outputs()]
    [r] = score_session([request(sid, cands)], snapshots=store, token_counter=words, answerer=answerer,
                        judge=judge, config=RewardConfig(batch_size=64), cache=BaseCache())
    assert r.task_rewards == (1.0, 0.5, 1.0, 0.5)
    # 2 distinct candidates x 2 questions = 4 contexts, one batch; 4 (question, answer) pairs at most
    assert answerer.batches == [4] and judge.calls <= 4


def test_a_judge_that_returns_garbage_is_a_failure_not_a_verdict(tmp_path):
    store, sid = put_state(tmp_path)

    class Garbage:
        name = "garbage"

        def judge(self, question, answer):
            return "CORRECT"

    [r] = score_session([request(sid, [outputs()])], snapshots=store, token_counter=words,
                        answerer=ExtractiveAnswerer(), judge=Garbage(), cache=BaseCache())
    assert all(s.masked and "returned str, not a Verdict" in s.mask_reason for s in r.samples)


def test_qa_question_carries_date_and_abstention():
    q = qa_question(QAPair("Q?", "Not answerable", "abstention", question_date="2023-05-08T10:30:00"), 3)
    assert q.question_id == "qa3" and q.is_abstention and q.question_date.hour == 10
    assert qa_question(QAPair("Q?", "A", question_id="x"), 0).question_date is None
