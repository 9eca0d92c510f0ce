"""Properties of score_session over random candidates, and equality with the naive baseline
(a bank restored and rebuilt per candidate, `benchmarks.bench_reward.naive_task_rewards`)."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.bench_reward import naive_task_rewards
from membuilder.answering import ExtractiveAnswerer
from membuilder.embedders import HashingEmbedder
from membuilder.judging import RuleJudge
from reward import RewardConfig, score_session
from reward.score import BaseCache

from .helpers import BIKE, EMPTY, RIDE, outputs, put_state, request, words

EMB = HashingEmbedder(dim=64)
LONG = json.dumps({"operations": [{"action": "ADD", "memory": " ".join(["w"] * 300)}]})
RAWS = {
    "core": [EMPTY, '{"action": "APPEND", "content": "Ann bought a bike."}', "garbage",
             '{"action": "REPLACE", "old_text": "tea", "new_text": "coffee"}',
             '{"action": "REPLACE", "old_text": "absent", "new_text": "x"}',
             json.dumps({"action": "APPEND", "content": " ".join(["w"] * 300)})],
    "episodic": [EMPTY, RIDE, LONG, '{"operations": [{"action": "UPDATE", "id": "E2", "new_memory": "Ann went to Rome."}]}',
                 '{"operations": [{"action": "MERGE", "ids": ["E2", "S1"], "new_memory": "x"}]}', "{"],
    "semantic": [EMPTY, BIKE, LONG, '{"operations": [{"action": "SKIP", "reason": "nothing"}]}',
                 '{"operations": [{"action": "UPDATE", "id": "S1", "new_memory": "Ann likes coffee."}]}'],
    "procedural": [EMPTY, LONG, '{"operations": [{"action": "SKIP"}]}',
                   '{"operations": [{"action": "ADD", "memory": "Ann oils the bike chain every Sunday."}]}'],
}
candidate = st.fixed_dictionaries({a: st.sampled_from(v) for a, v in RAWS.items()})
ANSWER, JUDGE = ExtractiveAnswerer(), RuleJudge()


@pytest.fixture(scope="module")
def snap(tmp_path_factory):
    return put_state(tmp_path_factory.mktemp("snap"), embedder=EMB)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(candidate, min_size=1, max_size=4), st.booleans(), st.booleans())
def test_reward_properties(snap, cands, attribution, length_penalty):
    store, sid = snap
    expert_tokens = {a: words(cands[0][a]) for a in RAWS}  # candidate 0 is "the expert" for lengths
    config = RewardConfig(attribution=attribution, length_penalty=length_penalty)
    req = request(sid, cands, expert_tokens=expert_tokens)
    [r] = score_session([req], snapshots=store, token_counter=words, answerer=ANSWER, judge=JUDGE,
                        config=config, embedder=EMB, cache=BaseCache())
    assert len(r.samples) == 4 * len(cands)
    for s in r.samples:
        assert not s.masked and 0.0 <= s.reward <= 1.0 and 0.0 <= s.length_penalty <= 1.0
        if not s.valid:
            assert s.reward == 0.0 and s.invalid_reason
        else:
            assert s.reward == pytest.approx(s.task_reward * (1 - 0.8 * s.length_penalty))
        if s.agent == "core":
            assert s.weight == 1.0  # attribution never boosts core
        if s.agent != "core" and s.index == 0:
            assert s.length_penalty == 0.0  # an output as long as the expert's is never penalised
        if s.weight != 1.0:
            assert attribution and s.agent == s.dominant_kind and s.retrieval_counts[s.agent] > 0
    # the copy-on-write path gives the naive path's task rewards, candidate by candidate
    assert list(r.task_rewards) == naive_task_rewards(req, store, EMB, ANSWER, JUDGE, config)


def test_the_naive_baseline_agrees_on_hand_computed_values(tmp_path):
    store, sid = put_state(tmp_path)
    req = request(sid, [outputs(semantic=BIKE), outputs()])
    assert naive_task_rewards(req, store, None, ANSWER, JUDGE, RewardConfig()) == [1.0, 0.5]
