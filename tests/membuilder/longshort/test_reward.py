"""Group rewards of long/short-term rollouts for the trainer, worked by hand."""

import json
from datetime import datetime

import pytest

from membuilder.bank import MemoryBank
from membuilder.datasets import Message, Session
from membuilder.judging import RuleJudge
from membuilder.longshort import LongShortSample, OfflineAnswerAgent, rollout_prompts, score_longshort_group
from membuilder.longshort.builder import LONG_TERM_KIND
from membuilder.operations import Add
from membuilder.store import InMemoryStore
from reward.types import QAPair, SessionReward

SESSION = Session("s1", datetime(2023, 5, 8), None, (Message("Ann", "user", "I adopted a cat named Tom.", "s1:0"),))
QA = (QAPair("What is Ann's cat called?", "Tom", "single-session"),)


def state():
    bank = MemoryBank(InMemoryStore(), "u")
    bank.apply([Add(LONG_TERM_KIND, "Ann has a dog named Rex.")])  # S1
    return bank.snapshot()


def split(important, unimportant=()):
    return json.dumps({"important": list(important), "unimportant": list(unimportant)})


def lt(*decisions):
    return json.dumps({"decisions": list(decisions)})


CAT, DOG = "Ann adopted a cat named Tom.", "Ann has a dog named Rex."
SAMPLES = [
    # g0: the expert's answer
    LongShortSample(split([CAT]), lt({"fact": 0, "action": "ADD", "memory": CAT})),
    # g1: also calls the known dog fact important -> its decision is NOOP
    LongShortSample(split([CAT, DOG]), lt({"fact": 0, "action": "ADD", "memory": CAT}, {"fact": 1, "action": "NOOP"})),
    # g2: the splitter's answer does not parse
    LongShortSample("I think the facts are: a cat."),
    # g3: a valid split, a long-term answer naming an id it was not shown
    LongShortSample(split([CAT]), lt({"fact": 0, "action": "UPDATE", "id": "S42", "memory": CAT})),
    # g4: a state over the limit (10) and no consolidation answer
    LongShortSample(split([CAT], ["Ann said hello to everyone."]), lt({"fact": 0, "action": "ADD", "memory": CAT}),
                    json.dumps({"state": "Ann said hello to everyone."})),
]


def test_group_rewards_by_hand():
    r = score_longshort_group(state(), SESSION, QA, SAMPLES, answerer=OfflineAnswerAgent(), judge=RuleJudge(),
                              noop_weight=0.5, state_limit=10)
    assert isinstance(r, SessionReward) and r.session_id == "s1"
    # T: g0, g1, g4 store the cat fact -> the answer holds "Tom" -> 1; g2, g3 store nothing new -> 0
    assert r.task_rewards == (1.0, 1.0, 0.0, 0.0, 1.0)
    assert r.sample("splitter", 0).reward == 1.0 and r.sample("long_term", 0).reward == 1.0
    # g1: splitter 1 - 0.5 * 1 NOOP / 2 important facts = 0.75; the long-term agent's own reward is T
    assert r.sample("splitter", 1).reward == pytest.approx(0.75) and r.sample("long_term", 1).reward == 1.0
    # g2: invalid splitter -> 0, and no long-term / short-term sample at all
    s = r.sample("splitter", 2)
    assert (s.valid, s.reward) == (False, 0.0) and "no JSON object" in s.invalid_reason
    with pytest.raises(KeyError):
        r.sample("long_term", 2)
    # g3: the long-term answer is invalid (0); the splitter's valid split earns T = 0 here
    assert r.sample("long_term", 3).reward == 0.0 and "not shown with fact 0" in r.sample("long_term", 3).invalid_reason
    assert r.sample("splitter", 3).reward == 0.0 and r.sample("splitter", 3).valid
    # g4: short-term state 27 characters > 10 with no consolidation -> invalid; the rest as g0
    st = r.sample("short_term", 4)
    assert not st.valid and st.reward == 0.0 and "no consolidation answer" in st.invalid_reason
    assert r.sample("splitter", 4).reward == 1.0
    assert SessionReward.from_dict(r.to_dict()).samples == r.samples  # the trainer's JSON shape


def test_no_qa_masks_valid_samples_and_answer_failure_masks_with_reason():
    r = score_longshort_group(state(), SESSION, (), SAMPLES[:1], answerer=OfflineAnswerAgent(), judge=RuleJudge())
    assert all(s.masked and s.reward is None and s.mask_reason == "the chunk has no QA" for s in r.samples)

    class Broken:
        name = "broken"

        def answer(self, question, context):
            raise TimeoutError("answer model timed out")

    r = score_longshort_group(state(), SESSION, QA, SAMPLES[2:4], answerer=Broken(), judge=RuleJudge())
    assert r.task_rewards == (None, None)
    # candidates 0, 1 of this group are SAMPLES[2], SAMPLES[3]
    assert r.sample("splitter", 0).reward == 0.0 and not r.sample("splitter", 0).masked  # invalid stays 0
    assert r.sample("splitter", 1).masked and "timed out" in r.sample("splitter", 1).mask_reason
    assert r.sample("long_term", 1).reward == 0.0 and not r.sample("long_term", 1).masked


def test_rollout_prompts_show_the_candidates_the_reward_checks():
    prompts = rollout_prompts(state(), SESSION, split([DOG], ["hi"]))
    assert "S1" in prompts["long_term"][1]["content"] and "Fact 0: " + DOG in prompts["long_term"][1]["content"]
    assert "- hi" in prompts["short_term"][1]["content"]
    assert rollout_prompts(state(), SESSION, "junk") == {}


def test_reward_fn_adapter_reads_snapshots_and_requests(tmp_path):
    from membuilder.longshort import make_longshort_reward_fn
    from membuilder.snapshots import SnapshotStore
    from reward.types import SessionRewardRequest

    store = SnapshotStore(tmp_path / "snaps")
    sid = store.put(state())
    outputs = tuple({k: v for k, v in (("splitter", s.splitter), ("long_term", s.long_term)) if v is not None}
                    for s in SAMPLES[:2])
    req = SessionRewardRequest(owner="u", snapshot_id=sid, session_id="s1", qa=QA, expert_tokens={},
                               outputs=outputs)
    fn = make_longshort_reward_fn(store, {"s1": SESSION}.__getitem__, answerer=OfflineAnswerAgent(),
                                  judge=RuleJudge(), noop_weight=0.5)
    [r] = fn([req])
    # the same as scoring SAMPLES[:2] directly: splitter 1.0 and 0.75
    assert [r.sample("splitter", g).reward for g in (0, 1)] == [1.0, 0.75]
