import json

import pytest

from reward.types import QAPair, RewardInputError, SampleReward, SessionReward, SessionRewardRequest


def _request():
    return SessionRewardRequest(
        owner="c1", snapshot_id="b" * 64, session_id="s2", session_date="2023-05-08",
        qa=(QAPair("When did Ann move?", "May 2023", "temporal", "world", "2023-06-01", "q1"),),
        expert_tokens={"core": 10, "episodic": 0, "semantic": 3, "procedural": 0},
        outputs=({"core": "{}", "episodic": '{"operations": []}'},) * 2,
        expert_outputs={"core": "{}"})


def test_request_json_round_trip():
    req = _request()
    again = SessionRewardRequest.from_dict(json.loads(json.dumps(req.to_dict())))
    assert again == req and again.group_size == 2


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("owner"), "request.owner is missing"),
    (lambda d: d.update(owner=3), "request.owner must be"),
    (lambda d: d["expert_tokens"].update(dream=1), "unknown agent 'dream'"),
    (lambda d: d["expert_tokens"].update(core=-1), "expert_tokens.core must be an integer >= 0"),
    (lambda d: d["expert_tokens"].update(core=True), "expert_tokens.core must be an integer >= 0"),
    (lambda d: d["outputs"].append(["x"]), r"outputs\[2\] must be an object"),
    (lambda d: d["outputs"][0].update(core=5), r"outputs\[0\].core must be a string"),
    (lambda d: d["qa"][0].update(qtype="trivia"), "qtype must be one of"),
    (lambda d: d["qa"][0].update(question=""), "question must be a non-empty string"),
    (lambda d: d.update(session_date=7), "session_date must be a string or null"),
])
def test_request_errors_name_the_field(mutate, message):
    d = _request().to_dict()
    mutate(d)
    with pytest.raises(RewardInputError, match=message):
        SessionRewardRequest.from_dict(d)


def test_session_reward_round_trip_keeps_masks():
    samples = (SampleReward("core", 0, True, 0.6, 0.0, 0.6, 1.0, "episodic", {"episodic": 2}),
               SampleReward("episodic", 0, False, None, 0.0, None, 4.0, None, masked=True,
                            mask_reason="judge timed out"))
    reward = SessionReward("s2", samples, (0.6, None))
    again = SessionReward.from_dict(json.loads(json.dumps(reward.to_dict())))
    assert again == reward
    assert again.sample("episodic", 0).reward is None
    with pytest.raises(KeyError):
        again.sample("semantic", 0)
    with pytest.raises(RewardInputError, match="finite"):
        SampleReward.from_dict({**samples[0].to_dict(), "reward": float("nan")})


@pytest.mark.parametrize("field, value, message", [
    ("valid", "false", "valid must be true or false"),
    ("masked", 1, "masked must be true or false"),
    ("weight", None, "must be numbers"),
    ("retrieval_counts", {"episodic": -1}, "retrieval_counts"),
    ("output_tokens", 2.5, "output_tokens"),
])
def test_sample_from_dict_is_strict(field, value, message):
    d = SampleReward("core", 0, True, 0.5, 0.0, 0.5, 1.0, None).to_dict()
    d[field] = value
    with pytest.raises(RewardInputError, match=message):
        SampleReward.from_dict(d)


def test_zero_weight_survives_the_round_trip():
    # a weight of 0 is a value, not a missing one (a bug once turned it into 1.0)
    s = SampleReward("episodic", 3, True, 0.0, 0.25, 0.0, 0.0, None)
    assert SampleReward.from_dict(s.to_dict()).weight == 0.0


def test_qa_and_reward_lists_are_type_checked():
    with pytest.raises(RewardInputError, match="qa.source must be a string"):
        QAPair.from_dict({"question": "q", "answer": "a", "source": 5})
    with pytest.raises(RewardInputError, match="task_rewards"):
        SessionReward.from_dict({"session_id": "s", "samples": [], "task_rewards": ["x"]})
