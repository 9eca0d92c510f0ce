"""Judging an answer against a question's gold answer: an LLM judge and an offline rule judge.

Both return a `Verdict`. `correct=None` means the judgement itself failed (the judge model
was unreachable, or kept answering something that is not the agreed JSON): such a question is
counted as a judge error, never as wrong (REFERENCE item 14).

`RuleJudge` is a rule judge, not a model: it compares normalised text. Normalisation
(`normalize_tokens`): lower case; "&" -> "and"; every character that is not a letter, digit or
whitespace becomes a space (so "$12" -> "12", "U.S." -> "u s"); the articles a / an / the are
dropped; number words zero..twenty and the tens up to ninety become digits ("two weeks" ->
"2 weeks"). A gold answer is then judged correct when

  1. its normalised tokens occur as one contiguous run inside the answer's tokens
     (containment), or
  2. the token F1 of answer against gold reaches `f1_threshold` (default 0.5: at least about
     half of each side's tokens are shared, which accepts re-ordered or lightly paraphrased
     short answers and refuses a long answer that merely mentions one gold word).

For an abstention question (the right answer is that memory does not say), the answer is
correct exactly when it is an abstention (`is_abstention_answer`); for any other question an
abstention is wrong. The same normalisation serves the retrieval-recall measure
(`context_contains_answer`).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from membuilder.agents.parsing import find_json_object
from membuilder.datasets import NOT_ANSWERABLE, Question
from membuilder.llm import ChatResult, LLMClient, LLMError
from membuilder.thinking import strip_think_blocks
from membuilder.types import InvalidInputError, check_text, excerpt

__all__ = [
    "Judge", "Verdict", "RuleJudge", "LLMJudge", "JudgeOutputError", "normalize_tokens",
    "token_f1", "contains_tokens", "is_abstention_answer", "context_contains_answer",
    "parse_judge_output", "render_judge_prompt",
]


@dataclass(frozen=True)
class Verdict:
    """`correct` is None exactly when judging failed; `error` then says why."""

    correct: bool | None
    reason: str
    error: str | None = None

    def __post_init__(self):
        if (self.correct is None) != (self.error is not None):
            raise ValueError("a Verdict has either a decision (correct=True/False) or an error, not both")


class Judge(Protocol):
    name: str

    def judge(self, question: Question, answer: str) -> Verdict: ...


# --- normalisation -------------------------------------------------------------------------------

_ARTICLES = frozenset({"a", "an", "the"})
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
_NUMBER_WORDS.update({w: str(10 * i) for i, w in enumerate(
    "thirty forty fifty sixty seventy eighty ninety".split(), start=3)})
_NON_WORD = re.compile(r"[^\w\s]|_")


def normalize_tokens(text: str) -> list[str]:
    """The normalised tokens of `text` (see the module docstring)."""
    if not isinstance(text, str):
        raise TypeError(f"expected a str to normalise, got {type(text).__name__}")
    text = unicodedata.normalize("NFKC", text).lower().replace("&", " and ")
    text = _NON_WORD.sub(" ", text)
    return [_NUMBER_WORDS.get(t, t) for t in text.split() if t not in _ARTICLES]


def contains_tokens(haystack: list[str], needle: list[str]) -> bool:
    """True when `needle` occurs as a contiguous run of `haystack` (an empty needle never does)."""
    n = len(needle)
    if n == 0 or n > len(haystack):
        return False
    first = needle[0]
    return any(haystack[i] == first and haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))


def token_f1(prediction: list[str], gold: list[str]) -> float:
    """SQuAD-style token F1 over multisets of tokens."""
    common = sum((Counter(prediction) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction), common / len(gold)
    return 2 * precision * recall / (precision + recall)


_ABSTENTION_PATTERNS = [re.compile(p) for p in (
    r"\bnot answerable\b", r"\bunanswerable\b", r"\bcannot be answered\b", r"\bcan ?not answer\b",
    r"\bnot (?:been )?mentioned\b", r"\bnever mentioned\b", r"\bno (?:relevant )?information\b",
    r"\bnot (?:enough|sufficient) information\b", r"\binformation is not available\b",
    r"\b(?:do not|don t|does not|doesn t) (?:know|mention|say|contain|include)\b",
    r"\bunknown\b", r"\bnot (?:known|specified|stated|provided)\b",
)]


def is_abstention_answer(answer: str) -> bool:
    """Whether `answer` declines to answer ("Not answerable", "not mentioned", "unknown", ...)."""
    text = " ".join(normalize_tokens(answer))
    return any(p.search(text) for p in _ABSTENTION_PATTERNS)


def context_contains_answer(context_text: str, gold: str) -> bool:
    """Retrieval recall of one question: the normalised gold answer occurs in the context."""
    return contains_tokens(normalize_tokens(context_text), normalize_tokens(gold))


# --- the rule judge --------------------------------------------------------------------------------


class RuleJudge:
    """Offline rule judge: normalised containment, else token F1 >= `f1_threshold` (module doc)."""

    name = "rule"

    def __init__(self, *, f1_threshold: float = 0.5):
        if not 0.0 < f1_threshold <= 1.0:
            raise ValueError(f"f1_threshold must be in (0, 1], got {f1_threshold}")
        self.f1_threshold = f1_threshold

    def judge(self, question: Question, answer: str) -> Verdict:
        if not isinstance(answer, str):
            raise TypeError(f"answer must be a str, got {type(answer).__name__}")
        abstained = is_abstention_answer(answer)
        if question.is_abstention:
            if abstained:
                return Verdict(True, "abstention question, and the answer abstains")
            return Verdict(False, "abstention question, but the answer does not abstain")
        if abstained:
            return Verdict(False, "the answer abstains, but the question has a gold answer")
        gold, pred = normalize_tokens(question.answer), normalize_tokens(answer)
        if not gold:  # a data problem, not a wrong answer: reported as a judge error
            return Verdict(None, "", error=f"gold answer {question.answer!r} has no tokens after "
                                           "normalisation; the rule judge cannot score it")
        if contains_tokens(pred, gold):
            return Verdict(True, "the normalised gold answer occurs in the answer")
        f1 = token_f1(pred, gold)
        if f1 >= self.f1_threshold:
            return Verdict(True, f"token F1 {f1:.2f} >= {self.f1_threshold}")
        return Verdict(False, f"gold answer not contained; token F1 {f1:.2f} < {self.f1_threshold}")


# --- the LLM judge ---------------------------------------------------------------------------------

_JUDGE_SYSTEM = (
    "You grade answers of a memory assistant. You get a question, the gold answer and the answer "
    "to grade. Answer with one JSON object and nothing else: "
    '{"verdict": "CORRECT" or "WRONG", "reason": "<one short sentence>"}.'
)
_JUDGE_RULES = (
    "Mark CORRECT when the answer states the same fact as the gold answer, even if worded "
    "differently, shorter or longer, as long as it does not contradict it. Dates and durations "
    "count as the same when they name the same day, month or period (e.g. '7 May 2023' and "
    "'May 7, 2023'). For a list, the answer must cover the gold items. Mark WRONG when the answer "
    "is different, contradicts the gold answer, is missing its key part, or declines to answer."
)
_JUDGE_RULES_ABSTAIN = (
    "This question cannot be answered from the conversation history: the correct response is to "
    "say that the information is not available (e.g. 'Not answerable'). Mark CORRECT when the "
    "answer says so (possibly explaining what is known instead); mark WRONG when it asserts an "
    "answer to the question."
)


def render_judge_prompt(question: Question, answer: str) -> list[dict]:
    """The judge's chat messages for one (question, answer)."""
    gold = question.answer
    if question.is_abstention:
        rules = _JUDGE_RULES_ABSTAIN
        gold = f"{NOT_ANSWERABLE} ({question.answer})" if question.answer != NOT_ANSWERABLE else gold
    else:
        rules = _JUDGE_RULES
    user = (f"{rules}\n\nQuestion: {question.question}\nGold answer: {gold}\n"
            f"Answer to grade: {answer}\n\nReply with the JSON object only.")
    return [{"role": "system", "content": _JUDGE_SYSTEM}, {"role": "user", "content": user}]


class JudgeOutputError(ValueError):
    """The judge model's output is not the agreed JSON verdict."""


def parse_judge_output(raw: str) -> Verdict:
    """Strictly parse `{"verdict": "CORRECT"|"WRONG", "reason": str}`.

    Repair is limited to removing think-blocks (`membuilder.thinking`, the agents' rules) and code
    fences and taking the first balanced object; the object must have exactly those two keys; the
    verdict is compared case-insensitively. Whatever the text, the only exception is
    `JudgeOutputError` (the agents' object finder never raises on model text).
    """
    if not isinstance(raw, str):
        raise JudgeOutputError(f"judge output is a {type(raw).__name__}, not text")
    stripped = strip_think_blocks(raw)
    obj, _, error = find_json_object(stripped.text)  # the agents' parser: string-aware, fences skipped
    if error is not None:
        raise JudgeOutputError(error + (f"; {stripped.note}" if stripped.note else ""))
    keys = set(obj)
    if keys != {"verdict", "reason"}:
        raise JudgeOutputError(f"expected keys ['reason', 'verdict'], got {excerpt(sorted(keys), 200)}")
    verdict, reason = obj["verdict"], obj["reason"]
    if not isinstance(verdict, str) or verdict.strip().upper() not in ("CORRECT", "WRONG"):
        raise JudgeOutputError(f"verdict must be 'CORRECT' or 'WRONG', got {excerpt(verdict)}")
    if not isinstance(reason, str):
        raise JudgeOutputError(f"reason must be a string, got {type(reason).__name__}")
    try:
        check_text(reason, "reason")  # a lone surrogate would break every record written later
    except InvalidInputError as exc:
        raise JudgeOutputError(str(exc)) from None
    return Verdict(verdict.strip().upper() == "CORRECT", reason.strip())


def _parses(result: ChatResult) -> bool:
    try:
        parse_judge_output(result.text)
    except JudgeOutputError:
        return False
    return True


class LLMJudge:
    """CORRECT / WRONG judge on an OpenAI-compatible model through `membuilder.llm.LLMClient`.

    An unparseable output is re-asked (bypassing the response cache) up to `max_retries` more
    times; if every attempt is unparseable, or the client fails after its own transport retries,
    the verdict is an error (`correct=None`), not WRONG. Only a parseable verdict is cached, so a
    rerun never replays an unparseable one.
    """

    def __init__(self, client: LLMClient, *, model: str | None = None, max_retries: int = 2,
                 temperature: float = 0.0, max_tokens: int = 256):
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.client = client
        self.model = model
        self.max_retries = max_retries
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.name = f"llm:{model or client.config.model}"

    def judge(self, question: Question, answer: str) -> Verdict:
        messages = render_judge_prompt(question, answer)
        problems: list[str] = []
        for attempt in range(self.max_retries + 1):
            try:
                result = self.client.chat(messages, model=self.model, temperature=self.temperature,
                                          max_tokens=self.max_tokens, use_cache=attempt == 0,
                                          cache_if=_parses)
            except LLMError as exc:
                return Verdict(None, "", error=f"judge call failed: {exc}")
            try:
                return parse_judge_output(result.text)
            except JudgeOutputError as exc:
                cut = " (output truncated by max_tokens)" if result.truncated else ""
                problems.append(f"attempt {attempt + 1}: {exc}{cut}")
        return Verdict(None, "", error="unparseable judge output: " + "; ".join(problems))
