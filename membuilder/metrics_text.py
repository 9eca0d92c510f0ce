"""Text metrics of MemoryAgentBench and MemoryBench, beside the judges of `membuilder.judging`.

Normalisation (`normalize_answer`, the usual SQuAD rule both benchmarks use): lower case, ASCII
punctuation removed, the articles a / an / the removed, whitespace collapsed. Over aliases a
metric takes the best score (MemoryAgentBench's answers are lists of aliases).

- `exact_match`: normalised prediction equals a normalised alias;
- `substring_exact_match`: a normalised alias occurs in the normalised prediction, as a run of
  whole tokens (so "10" is not found inside "2010");
- `token_f1`: token-level F1 of the normalised texts (multiset overlap);
- `rouge_l`: ROUGE-L F1 over whitespace tokens of the normalised texts (longest common subsequence);
- `recall_at_k`: of the gold items, the fraction found among the first k predicted items
  (`split_items` cuts a prediction into items: one per line or comma, list markers dropped).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"expected a str, got {type(text).__name__}")
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def _aliases(gold: str | Iterable[str]) -> list[str]:
    aliases = [gold] if isinstance(gold, str) else list(gold)
    if not aliases or not all(isinstance(a, str) for a in aliases):
        raise ValueError("gold must be a string or a non-empty list of strings")
    return aliases


def exact_match(prediction: str, gold: str | Iterable[str]) -> float:
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(a) for a in _aliases(gold)))


def substring_exact_match(prediction: str, gold: str | Iterable[str]) -> float:
    p = normalize_answer(prediction).split()
    for alias in _aliases(gold):
        a = normalize_answer(alias).split()
        if a and any(p[i:i + len(a)] == a for i in range(len(p) - len(a) + 1)):
            return 1.0
    return 0.0


def _f1(pred: list[str], ref: list[str]) -> float:
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, gold: str | Iterable[str]) -> float:
    p = normalize_answer(prediction).split()
    return max(_f1(p, normalize_answer(a).split()) for a in _aliases(gold))


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, gold: str | Iterable[str]) -> float:
    p = normalize_answer(prediction).split()
    best = 0.0
    for alias in _aliases(gold):
        r = normalize_answer(alias).split()
        lcs = _lcs(p, r) if p and r else 0
        if lcs:
            precision, recall = lcs / len(p), lcs / len(r)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


_MARKER = re.compile(r"^\s*(?:\d+[.)]|[-*\u2022])\s*")


def split_items(prediction: str) -> list[str]:
    """A predicted list as items: one per line or comma, list markers ("1.", "-") dropped."""
    items = []
    for line in prediction.split("\n"):
        for part in line.split(","):
            part = _MARKER.sub("", part).strip()
            if part:
                items.append(part)
    return items


def recall_at_k(prediction: str | Sequence[str], gold: Sequence[str], k: int = 5) -> float:
    """Fraction of `gold` items (normalised) among the first `k` predicted items."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    items = split_items(prediction) if isinstance(prediction, str) else list(prediction)
    wanted = {normalize_answer(g) for g in _aliases(gold)}
    top = {normalize_answer(x) for x in items[:k]}
    return len(wanted & top) / len(wanted)


METRICS = {"exact_match": exact_match, "substring_exact_match": substring_exact_match, "f1": token_f1,
           "rouge_l": rouge_l, "recall@5": recall_at_k}


def score(metric: str, prediction: str, gold: str | Sequence[str]) -> float:
    """One metric by name (`METRICS`)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(METRICS)}")
    return METRICS[metric](prediction, gold)
