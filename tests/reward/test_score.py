"""score_session on small sessions with rewards worked out by hand.

The state before (tests/reward/helpers.py): core "Ann likes tea.", S1 "Ann likes green tea.",
E2 "Ann went to Paris in 2022.". QA: (1) "Which city did Ann visit in 2022?" -> Paris, answerable
from the state before; (2) "What did Ann name her new bike?" -> Rocket, answerable only when the
candidate wrote it. Offline extractive answerer + rule judge, no embedder (BM25 only), token
counter = whitespace pieces. So T = 1 for a candidate that records the bike, 1/2 otherwise.
"""

import json
import threading

import pytest

from membuilder.answering import ExtractiveAnswerer
from membuilder.judging import RuleJudge, Verdict
from membuilder.snapshots import UnknownSnapshotError
from reward import RewardConfig, RewardInputError, make_reward_fn, score_session
from reward.score import BaseCache

from .helpers import BIKE, EMPTY, QA, RIDE, outputs, put_state, request, words

ANSWER, JUDGE = ExtractiveAnswerer(), RuleJudge()


def score(store, reqs, config=None, answerer=ANSWER, judge=JUDGE, embedder=None):
    return score_session(reqs, snapshots=store, token_counter=words, answerer=answerer, judge=judge,
                         config=config or RewardConfig(), embedder=embedder, cache=BaseCache())


def by(reward):
    return {(s.index, s.agent): s for s in reward.samples}


@pytest.fixture
def snap(tmp_path):
    return put_state(tmp_path)


def test_task_reward_attribution_and_sample_order(snap):
    store, sid = snap
    [r] = score(store, [request(sid, [outputs(semantic=BIKE), outputs()])])
    assert r.task_rewards == (1.0, 0.5)
    assert [(s.index, s.agent) for s in r.samples] == [(g, a) for g in (0, 1)
                                                       for a in ("core", "episodic", "semantic", "procedural")]
    s = by(r)
    # candidate 0: its new entry S3 was retrieved for both questions -> semantic 2, dominant
    assert s[0, "semantic"].retrieval_counts == {"episodic": 0, "semantic": 2, "procedural": 0}
    assert s[0, "semantic"].dominant_kind == "semantic" and s[0, "semantic"].weight == 4.0
    assert [s[0, a].weight for a in ("core", "episodic", "procedural")] == [1.0, 1.0, 1.0]
    assert all(s[0, a].reward == 1.0 for a in ("core", "episodic", "semantic", "procedural"))
    # candidate 1 wrote nothing: the pre-session entries it retrieved do not count -> no boost
    assert s[1, "episodic"].retrieval_counts == {"episodic": 0, "semantic": 0, "procedural": 0}
    assert s[1, "episodic"].dominant_kind is None and all(s[1, a].weight == 1.0 for a in ("episodic", "semantic"))
    assert all(s[1, a].reward == 0.5 and not s[1, a].masked for a in ("core", "semantic"))
    assert s[0, "semantic"].output_tokens == words(BIKE) == 10


def test_validity_gate_zeroes_the_invalid_agent_and_keeps_the_others_work(snap):
    store, sid = snap
    bad_update = json.dumps({"operations": [{"action": "UPDATE", "id": "E99", "new_memory": "x"}]})
    cands = [outputs(episodic=bad_update, semantic=BIKE),
             outputs(core='{"action": "REPLACE", "old_text": "coffee", "new_text": "x"}', semantic=BIKE),
             outputs(procedural="not json at all", semantic=BIKE)]
    [r] = score(store, [request(sid, cands)])
    s = by(r)
    assert r.task_rewards == (1.0, 1.0, 1.0)  # the valid semantic ADD is applied in every candidate
    assert not s[0, "episodic"].valid and s[0, "episodic"].reward == 0.0
    assert "no entry with id 'E99'" in s[0, "episodic"].invalid_reason
    assert not s[1, "core"].valid and s[1, "core"].reward == 0.0
    assert not s[2, "procedural"].valid and s[2, "procedural"].invalid_reason.startswith("unparsable answer")
    assert s[0, "semantic"].reward == s[1, "episodic"].reward == s[2, "core"].reward == 1.0


def test_core_over_the_limit_is_invalid(tmp_path):
    store, sid = put_state(tmp_path)
    rewrite = json.dumps({"action": "REWRITE", "content": "x" * 5001})
    [r] = score(store, [request(sid, [outputs(core=rewrite)])])
    assert not by(r)[0, "core"].valid and by(r)[0, "core"].reward == 0.0
    assert "over the limit of 5000" in by(r)[0, "core"].invalid_reason


def test_length_penalties_in_the_reward(snap):
    store, sid = snap
    long_sem = json.dumps({"operations": [{"action": "ADD", "memory": "Ann named her new bike Rocket."},
                                          {"action": "ADD", "memory": " ".join(["w"] * 542)}]})
    # 13 JSON / text pieces + 542 w's = 555 tokens; expert 300: r = 1.85 -> l = (1.85 - 1.3) / 0.7
    assert words(long_sem) == 555
    append = json.dumps({"action": "APPEND", "content": " ".join(["w"] * 275)})  # growth 275 -> l = 0.5
    replace = json.dumps({"action": "REPLACE", "old_text": "tea", "new_text": "tea " + " ".join(["w"] * 200)})
    shrink = json.dumps({"action": "REWRITE", "content": "Ann."})  # 3 -> 1 token: free
    cands = [outputs(core=append, semantic=long_sem), outputs(core=replace, semantic=BIKE),
             outputs(core=shrink, semantic=BIKE)]
    [r] = score(store, [request(sid, cands, expert_tokens={"core": 0, "episodic": 0, "semantic": 300,
                                                                 "procedural": 0})])
    s = by(r)
    assert r.task_rewards == (1.0, 1.0, 1.0)
    assert s[0, "semantic"].length_penalty == pytest.approx(0.55 / 0.7)
    assert s[0, "semantic"].reward == pytest.approx(1 - 0.8 * 0.55 / 0.7)  # 0.3714...
    assert s[0, "core"].length_penalty == pytest.approx(0.5) and s[0, "core"].reward == pytest.approx(0.6)
    # "Ann likes tea." (3) -> "Ann likes tea w ... w." (203): growth 200 -> l = 50 / 250 = 0.2
    assert s[1, "core"].length_penalty == pytest.approx(0.2) and s[1, "core"].reward == pytest.approx(0.84)
    assert s[2, "core"].length_penalty == 0.0 and s[2, "core"].reward == 1.0
    # semantic BIKE: 10 tokens vs 300: they differ by 290 >= 200, r = 0.033 -> full penalty 1
    assert s[1, "semantic"].length_penalty == 1.0 and s[1, "semantic"].reward == pytest.approx(0.2)
    off = by(score(store, [request(sid, cands[:1])], RewardConfig(length_penalty=False))[0])
    assert off[0, "semantic"].reward == 1.0 and off[0, "core"].length_penalty == 0.0


def test_a_session_without_qa_is_masked_everywhere(snap):
    store, sid = snap
    [r] = score(store, [request(sid, [outputs(semantic=BIKE), outputs(episodic="junk")], qa=())])
    assert all(s.masked and s.reward is None and s.task_reward is None for s in r.samples)
    assert {s.mask_reason for s in r.samples} == {"the session has no QA pairs"}
    assert r.task_rewards == (None, None)


class Raising:
    name = "raising"

    def answer(self, question, context):
        raise ConnectionError("answer server down")


def test_an_answerer_that_raises_masks_the_valid_samples(snap):
    store, sid = snap
    [r] = score(store, [request(sid, [outputs(semantic=BIKE, episodic="junk")])], answerer=Raising())
    s = by(r)
    for agent in ("core", "semantic", "procedural"):
        assert s[0, agent].masked and s[0, agent].reward is None and s[0, agent].task_reward is None
        assert s[0, agent].mask_reason == ("2 of 2 questions could not be scored; first: "
                                           "ConnectionError: answer server down")
    # v = 0 makes R = 0 whatever T is: the invalid sample keeps its exact reward
    assert not s[0, "episodic"].masked and s[0, "episodic"].reward == 0.0 and s[0, "episodic"].task_reward is None
    assert r.task_rewards == (None,)


def test_an_answerer_that_times_out_masks_only_its_candidate(snap):
    store, sid = snap
    release = threading.Event()

    class Slow:
        name = "slow"

        def answer(self, question, context):
            if any("Rocket" in h.entry.text for h in context.hits):
                release.wait(10)
            return ANSWER.answer(question, context)

    cfg = RewardConfig(call_timeout_s=0.2)
    try:
        [r] = score(store, [request(sid, [outputs(semantic=BIKE), outputs()])], cfg, answerer=Slow())
    finally:
        release.set()
    s = by(r)
    assert s[0, "semantic"].masked and "no answer within call_timeout_s=0.2" in s[0, "semantic"].mask_reason
    assert r.task_rewards == (None, 0.5) and s[1, "semantic"].reward == 0.5


def test_a_judge_error_masks_and_is_never_wrong(snap):
    store, sid = snap

    class Broken:
        name = "broken"

        def judge(self, question, answer):
            if "Paris" in question.answer:
                return Verdict(None, "", error="judge output unparseable")
            return JUDGE.judge(question, answer)

    [r] = score(store, [request(sid, [outputs(semantic=BIKE)])], judge=Broken())
    assert all(s.masked and "judge error: judge output unparseable" in s.mask_reason for s in r.samples)


def test_question_date_and_owner_reach_the_answerer(tmp_path):
    store, sid = put_state(tmp_path, owner="expert-owner")
    seen = []

    class Recording:
        name = "rec"

        def answer(self, question, context):
            seen.append((question.question, context.question_date, context.date_is_inferred,
                         {h.entry.owner for h in context.hits}))
            return ANSWER.answer(question, context)

    qa = (QA[0], QA[1].__class__(QA[1].question, "Rocket", "single-session"))  # the second has no date
    [r] = score(store, [request(sid, [outputs()], qa=qa, owner="policy-owner")], answerer=Recording())
    # the pre-session entries are visible under the request's owner: question 1 is answered
    assert r.task_rewards == (0.5,)
    assert seen == [(QA[0].question, "8 May 2023", False, {"policy-owner"}),
                    (QA[1].question, "8 May 2023", True, {"policy-owner"})]  # the session date stands in


def test_sparse_reward_is_one_per_conversation(snap):
    store, sid = snap
    s1 = request(sid, [outputs(), outputs()], qa=QA[:1], session_id="session_1")
    s2 = request(sid, [outputs(semantic=BIKE), outputs()], qa=QA[1:], session_id="session_2")
    dense = score(store, [s1, s2])
    assert [r.task_rewards for r in dense] == [(1.0, 1.0), (1.0, 0.0)]
    sparse = score(store, [s1, s2], RewardConfig(dense=False))
    # the last session answers both questions; its T(g) and dominant kind go to every session
    assert [r.task_rewards for r in sparse] == [(1.0, 0.5), (1.0, 0.5)]
    assert by(sparse[0])[0, "semantic"].weight == 4.0 and by(sparse[0])[0, "core"].reward == 1.0
    other = request(sid, [outputs()], qa=(), owner="conv-2")
    with pytest.raises(RewardInputError, match="different group sizes"):
        score(store, [s1, request(sid, [outputs()], qa=QA[1:])], RewardConfig(dense=False))
    [_, _, r3] = score(store, [s1, s2, other], RewardConfig(dense=False))
    assert r3.samples[0].mask_reason == "the conversation has no QA pairs"


def test_counterfactual_credits_each_agent_with_its_own_effect(snap):
    store, sid = snap
    expert = outputs(semantic=BIKE)
    cand = outputs(episodic=RIDE)  # the episodic agent records the bike; the semantic agent does not
    req = request(sid, [cand], expert_outputs=expert)
    plain = by(score(store, [req])[0])
    assert plain[0, "semantic"].reward == 1.0 and plain[0, "episodic"].reward == 1.0
    cf = by(score(store, [req], RewardConfig(counterfactual=True))[0])
    # episodic: its RIDE + the expert's semantic BIKE -> 1; semantic: its empty + expert others -> 1/2
    assert cf[0, "episodic"].reward == 1.0 and cf[0, "semantic"].reward == 0.5
    assert cf[0, "core"].reward == 1.0  # core's own output is the expert's (a no-op): expert bank -> 1
    with pytest.raises(RewardInputError, match="expert_outputs is needed"):
        score(store, [request(sid, [cand])], RewardConfig(counterfactual=True))


def test_bad_requests_are_clear_errors_before_any_work(snap):
    store, sid = snap
    with pytest.raises(RewardInputError, match="snapshot_id"):
        score(store, [request("../../etc/passwd", [outputs()])])
    with pytest.raises(UnknownSnapshotError, match="no snapshot"):
        score(store, [request("0" * 64, [outputs()])])
    with pytest.raises(RewardInputError, match="expert_tokens lacks"):
        score(store, [request(sid, [outputs()], expert_tokens={"core": 0})])
    with pytest.raises(RewardInputError, match="not a SessionRewardRequest"):
        score(store, [{"owner": "x"}])
    bad_date = (QA[0].__class__("When?", "x", question_date="last Tuesday"),)
    with pytest.raises(RewardInputError, match=r"requests\[0\]\.qa\[0\]\.question_date: event time 'last Tuesday'"):
        score(store, [request(sid, [outputs()], qa=bad_date)])
    with pytest.raises(RewardInputError, match=r"requests\[0\]\.owner"):
        score(store, [request(sid, [outputs()], owner=" ")])


def test_reward_fn_is_thread_safe_and_equals_direct_calls(snap):
    store, sid = snap
    fn = make_reward_fn(snapshots=store, token_counter=words, answerer=ANSWER, judge=JUDGE)
    reqs = [request(sid, [outputs(semantic=BIKE if i % 2 else EMPTY), outputs()], session_id=f"s{i}")
            for i in range(8)]
    expected = [r.to_dict()["samples"] for r in score(store, reqs)]
    got: dict[int, list] = {}

    def worker(i):
        got[i] = [r.to_dict()["samples"] for r in fn(reqs[i:i + 1])]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i][0] for i in range(8)] == expected
    assert len(fn.cache._bases) == 1  # one state before, loaded once and shared
