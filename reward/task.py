"""The task reward's calls: answer each question from a candidate's memory, judge each answer.

Questions are `QAPair`s turned into the answer step's `Question` (`qa_question`): the question
date, when the pair has one, is given to the answerer; otherwise the session's date stands in
and the prompt says it is inferred. Retrieval and the prompt are the answer step's own
(`membuilder.answering.build_answer_context`) over the candidate's `CandidateSearch`.

Calls (`run_calls`):
- an answerer with `answer_batch(questions, contexts) -> list[str]` (a local model) and a judge
  with `judge_batch(questions, answers) -> list[Verdict]` are called in batches of
  `config.batch_size`;
- otherwise one call per item, `config.workers` at a time (1: in the calling thread);
- with `config.call_timeout_s`, each call runs in its own daemon thread and is abandoned after
  the limit (Python cannot stop a thread; an API client's own timeout ends it later).
Any exception or timeout of a call becomes a `CallFailure` with the reason, never a value: the
samples that needed it are masked. Identical calls are made once: answers are keyed on the
question and everything the answerer is shown (prompt, retrieved ids and scores), verdicts on
the question and the answer.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Hashable, Sequence

from membuilder.answering import AnswerContext
from membuilder.datasets import Question
from membuilder.judging import Verdict
from membuilder.types import normalise_time

from .config import RewardConfig
from .types import QAPair


@dataclass(frozen=True)
class CallFailure:
    """Why an answer or a verdict could not be had (exception, timeout, judge error)."""

    reason: str


def parse_date(value: str | None) -> datetime | None:
    """An ISO date or datetime string as a naive datetime (dates at midnight); None stays None."""
    if value is None:
        return None
    return datetime.fromisoformat(normalise_time(value))


def qa_question(qa: QAPair, index: int) -> Question:
    """The answer step's `Question` for a reward QA pair (abstention type -> abstention question)."""
    return Question(question_id=qa.question_id or f"qa{index}", question=qa.question, answer=qa.answer,
                    category=qa.qtype, evidence=(), question_date=parse_date(qa.question_date),
                    is_abstention=qa.qtype == "abstention", question_date_text=qa.question_date)


def context_key(question: Question, context: AnswerContext) -> Hashable:
    """Everything an answerer is given about one question: equal keys get one answer call."""
    return (question.question_id, question.question, question.question_date,
            tuple(m["content"] for m in context.prompt),
            tuple((h.entry.id, h.score, h.bm25_rank, h.dense_rank) for h in context.hits))


def _call(fn: Callable[[], Any], timeout: float | None) -> Any:
    if timeout is None:
        try:
            return fn()
        except Exception as exc:  # the reason is kept; the samples that needed it are masked
            return CallFailure(f"{type(exc).__name__}: {exc}")
    box: list = []

    def target():
        try:
            box.append(fn())
        except BaseException as exc:
            box.append(CallFailure(f"{type(exc).__name__}: {exc}"))

    thread = threading.Thread(target=target, daemon=True, name="reward-call")
    thread.start()
    thread.join(timeout)
    if thread.is_alive() or not box:
        return CallFailure(f"no answer within call_timeout_s={timeout}")
    return box[0]


def run_calls(single: Callable[[Any], Any], batch: Callable[[list], list] | None, items: Sequence[Any],
              config: RewardConfig) -> list[Any]:
    """Results of `single(item)` (or of `batch(chunk)`) for every item, failures as CallFailure."""
    items = list(items)
    if not items:
        return []
    timeout = config.call_timeout_s
    if batch is not None:
        chunks = [items[i:i + config.batch_size] for i in range(0, len(items), config.batch_size)]

        def one_chunk(chunk):
            out = _call(lambda: batch(chunk), timeout)
            if isinstance(out, CallFailure):
                return [out] * len(chunk)
            if not isinstance(out, (list, tuple)) or len(out) != len(chunk):
                return [CallFailure(f"batch call returned {type(out).__name__} of the wrong length for "
                                    f"{len(chunk)} items")] * len(chunk)
            return list(out)
        calls, jobs = one_chunk, chunks
    else:
        calls, jobs = (lambda item: _call(lambda: single(item), timeout)), items
    if config.workers == 1 or len(jobs) == 1:
        results = [calls(job) for job in jobs]
    else:
        with ThreadPoolExecutor(max_workers=min(config.workers, len(jobs)), thread_name_prefix="reward") as pool:
            results = list(pool.map(calls, jobs))
    return [r for chunk in results for r in chunk] if batch is not None else results


def _distinct(keys: Sequence[Hashable], items: Sequence) -> tuple[dict[Hashable, int], list]:
    """The first item of each key, in order, and each key's index among them (work done once)."""
    unique: dict[Hashable, int] = {}
    todo = []
    for key, item in zip(keys, items, strict=True):
        if key not in unique:
            unique[key] = len(todo)
            todo.append(item)
    return unique, todo


def answer_all(answerer, jobs: Sequence[tuple[Question, AnswerContext]], config: RewardConfig) -> list[str | CallFailure]:
    """One answer (or failure) per (question, context); identical contexts are answered once."""
    keys = [context_key(q, c) for q, c in jobs]
    unique, todo = _distinct(keys, jobs)
    batch = getattr(answerer, "answer_batch", None)
    out = run_calls(lambda job: answerer.answer(job[0], job[1]),
                    None if batch is None else (lambda chunk: batch([q for q, _ in chunk], [c for _, c in chunk])),
                    todo, config)
    checked = [a if isinstance(a, (str, CallFailure)) else
               CallFailure(f"answerer {getattr(answerer, 'name', '?')} returned {type(a).__name__}, not str")
               for a in out]
    return [checked[unique[k]] for k in keys]


def judge_all(judge, items: Sequence[tuple[Question, str]], config: RewardConfig) -> list[bool | CallFailure]:
    """One verdict (True / False, or failure) per (question, answer); duplicates judged once."""
    keys = [(q.question_id, q.question, q.answer, q.is_abstention, a) for q, a in items]
    unique, todo = _distinct(keys, items)
    batch = getattr(judge, "judge_batch", None)
    out = run_calls(lambda item: judge.judge(item[0], item[1]),
                    None if batch is None else (lambda chunk: batch([q for q, _ in chunk], [a for _, a in chunk])),
                    todo, config)
    verdicts: list[bool | CallFailure] = []
    for v in out:
        if isinstance(v, CallFailure):
            verdicts.append(v)
        elif not isinstance(v, Verdict):
            verdicts.append(CallFailure(f"judge {getattr(judge, 'name', '?')} returned {type(v).__name__}, not a Verdict"))
        elif v.correct is None:
            verdicts.append(CallFailure(f"judge error: {v.error}"))
        else:
            verdicts.append(bool(v.correct))
    return [verdicts[unique[k]] for k in keys]
