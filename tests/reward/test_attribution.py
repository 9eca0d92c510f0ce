"""Attribution counts only the candidate's own retrieved entries; ties and zero counts."""

from membuilder.answering import AnswerContext
from membuilder.bank import SearchResult
from membuilder.types import MemoryEntry, MemoryKind, Status
from reward.attribution import dominant_kind, retrieval_counts, sample_weight
from reward.config import RewardConfig


def _hit(entry_id: str, kind: str) -> SearchResult:
    e = MemoryEntry(entry_id, "o", MemoryKind(kind), "t", Status.ACTIVE, None, None, 0.0, 0.0)
    return SearchResult(e, 1.0, 1, None)


def _ctx(*hits) -> AnswerContext:
    return AnswerContext(core="", hits=list(hits), question_date=None, prompt=[])


def test_only_the_candidates_own_entries_count_and_repeats_count_per_question():
    contexts = [_ctx(_hit("E1", "episodic"), _hit("S5", "semantic"), _hit("E6", "episodic")),
                _ctx(_hit("S5", "semantic"), _hit("P2", "procedural"))]
    # own = S5 (retrieved twice) and E6 (once); E1 and P2 are pre-session entries: not counted
    assert retrieval_counts(contexts, {"S5", "E6", "P9"}) == {"episodic": 1, "semantic": 2, "procedural": 0}
    assert retrieval_counts(contexts, set()) == {"episodic": 0, "semantic": 0, "procedural": 0}


def test_dominant_kind_ties_and_zero():
    order = RewardConfig().tie_order  # episodic > semantic > procedural
    assert dominant_kind({"episodic": 1, "semantic": 2, "procedural": 0}, order) == "semantic"
    assert dominant_kind({"episodic": 2, "semantic": 2, "procedural": 2}, order) == "episodic"
    assert dominant_kind({"episodic": 0, "semantic": 3, "procedural": 3}, order) == "semantic"
    assert dominant_kind({"episodic": 0, "semantic": 3, "procedural": 3},
                         ("procedural", "semantic", "episodic")) == "procedural"
    assert dominant_kind({"episodic": 0, "semantic": 0, "procedural": 0}, order) is None  # no count, no boost


def test_weights():
    on, off = RewardConfig(), RewardConfig(attribution=False)
    assert sample_weight("semantic", "semantic", on) == 4.0
    assert sample_weight("episodic", "semantic", on) == 1.0
    assert sample_weight("core", "semantic", on) == 1.0
    assert sample_weight("semantic", None, on) == 1.0
    assert sample_weight("semantic", "semantic", off) == 1.0
    assert sample_weight("semantic", "semantic", RewardConfig(alpha=2.5)) == 2.5
