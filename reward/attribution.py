"""Attribution (DESIGN section 6, REFERENCE items 9 and 20).

Counted over the very retrieval that answered candidate g's questions (the `AnswerContext.hits`
the answerer was given, no second search), and only over entries candidate g's own operations
created or changed (`ApplyResult.touched`: new entries, updated entries and the new entries of
merges; never the state before's entries): counts by kind, summed over the session's questions
(an entry retrieved for two questions counts twice: it served both). The dominant kind is the one
with the largest count; ties go to the first kind in `RewardConfig.tie_order`; with no count at
all there is no dominant kind and no boost. The dominant kind's agent gets weight alpha, every
other agent 1; core is never retrieved, so never dominant, and always has weight 1.
"""

from __future__ import annotations

from typing import Collection, Iterable

from membuilder.answering import AnswerContext

from .config import SEARCHABLE, RewardConfig


def retrieval_counts(contexts: Iterable[AnswerContext], own_ids: Collection[str]) -> dict[str, int]:
    """Retrieved entries of each searchable kind that the candidate created or changed."""
    counts = {kind: 0 for kind in SEARCHABLE}
    own = set(own_ids)
    for context in contexts:
        for hit in context.hits:
            if hit.entry.id in own:
                counts[hit.entry.kind.value] += 1
    return counts


def dominant_kind(counts: dict[str, int], tie_order: tuple[str, ...]) -> str | None:
    """The kind with the largest positive count, ties by `tie_order`; None when all are 0."""
    best = max(counts.get(k, 0) for k in tie_order)
    if best <= 0:
        return None
    return next(k for k in tie_order if counts.get(k, 0) == best)


def sample_weight(agent: str, dominant: str | None, config: RewardConfig) -> float:
    """alpha for the dominant kind's agent when attribution is on, else 1 (core: always 1)."""
    return float(config.alpha) if config.attribution and dominant is not None and agent == dominant else 1.0
