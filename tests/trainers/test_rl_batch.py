"""The bookkeeping of an ADRPO batch (trainers.rl_batch), with hand-worked values."""

from __future__ import annotations

import math

import pytest
import torch

from reward.types import SampleReward, SessionReward
from rollout.session import SessionRollout
from rollout.types import Completion
from tests.trainers.adrpo_helpers import tiny_rl_rows
from trainers.rl_batch import (
    MaskReason,
    TISLevel,
    assign_advantages,
    batch_counts,
    build_requests,
    collect_samples,
    counts_to_metrics,
    epoch_order,
    group_sessions,
    step_sessions,
    tis_weights,
)


def _completion(n_tokens: int, finish: str = "stop") -> Completion:
    return Completion((1, 2), tuple(range(5, 5 + n_tokens)), tuple([-1.0] * n_tokens), "x" * n_tokens, finish)


def test_sessions_group_rows_and_steps_split_them_over_processes():
    rows = tiny_rl_rows(num_sessions=3, agents=("episodic", "core")) + tiny_rl_rows(1, split="heldout")
    sessions = group_sessions(rows)
    assert [s.key for s in sessions] == ["conv0/s0", "conv0/s1", "conv1/s2"]
    assert [r.agent for r in sessions[0].rows] == ["core", "episodic"]  # AGENTS order, whatever the file order
    assert [s.key for s in group_sessions(rows, agents=("core",))] == ["conv0/s0", "conv0/s1", "conv1/s2"]
    assert len(group_sessions(rows, split="heldout")) == 1
    with pytest.raises(ValueError, match="unknown agents"):
        group_sessions(rows, agents=("planner",))

    order = epoch_order(10, seed=0, epoch=0)
    assert sorted(order) == list(range(10)) and order != list(range(10))
    assert order == epoch_order(10, seed=0, epoch=0) and order != epoch_order(10, seed=0, epoch=1)
    assert epoch_order(4, 0, 0, shuffle=False) == [0, 1, 2, 3]
    # Step 1 of an epoch of 10 at 4 per step takes order[4:8]; 2 processes take alternate ones.
    assert step_sessions(list(range(10)), 1, 4, rank=0, world=2) == [4, 6]
    assert step_sessions(list(range(10)), 1, 4, rank=1, world=2) == [5, 7]
    assert step_sessions(list(range(10)), 2, 4, rank=0, world=1) == [8, 9]  # the short last batch


def _rollout(sessions, lengths):
    groups = {}
    for s in sessions:
        for r in s.rows:
            groups[(s.key, r.agent)] = tuple(_completion(n, "length" if n == 4 else "stop") for n in lengths)
    return SessionRollout(len(lengths), groups)


def _reward(req, values, masked=()):
    samples = []
    for agent in req.outputs[0]:
        for g, v in enumerate(values):
            off = (agent, g) in masked
            samples.append(
                SampleReward(agent=agent, index=g, valid=v > 0, task_reward=None if off else v, length_penalty=0.0,
                             reward=None if off else v, weight=4.0 if agent == "episodic" else 1.0,
                             dominant_kind="episodic", masked=off, mask_reason="judge timeout" if off else None)
            )
    return SessionReward(req.session_id, tuple(samples))


def test_requests_samples_masks_and_advantages():
    rows = tiny_rl_rows(num_sessions=3)
    rows = [r if r.session_id != "s2" else r.__class__(**{**r.__dict__, "qa": ()}) for r in rows]
    sessions = group_sessions(rows)
    # G = 3; completion lengths 2, 0 (empty) and 4 (cut at max_tokens) for every group.
    rollout = _rollout(sessions, [2, 0, 4])
    requests = build_requests(sessions, rollout)
    assert [r.session_id for r in requests] == ["s0", "s1", "s2"]
    assert requests[0].outputs[1] == {"core": "", "episodic": ""}
    assert requests[0].expert_tokens == {"core": 6, "episodic": 6}
    rewards = [
        _reward(requests[0], [1.0, 0.0, 0.5], masked={("core", 2)}),
        _reward(requests[1], [0.3, 0.3, 0.3]),
        None,  # no QA: never sent to the reward
    ]
    samples = collect_samples(sessions, rollout, requests, rewards, mask_truncated=True)
    assert len(samples) == 3 * 2 * 3
    by = {(s.session, s.agent, s.index): s for s in samples}
    assert by[("conv0/s0", "core", 2)].mask is MaskReason.REWARD_MASKED
    assert by[("conv0/s0", "core", 2)].mask_detail == "judge timeout"
    assert by[("conv0/s0", "core", 1)].mask is MaskReason.EMPTY and by[("conv0/s0", "core", 1)].reward == 0.0
    assert by[("conv0/s0", "episodic", 2)].mask is MaskReason.TRUNCATED
    assert all(s.mask is MaskReason.NO_QA for s in samples if s.session == "conv1/s2")

    groups = assign_advantages(samples, group_size=3)
    # conv0/s0 core: rewards 1, 0 (the empty one still counts) and masked: mean 0.5, unbiased
    # std sqrt(((0.5)^2 + (0.5)^2) / 1) = 0.707107 -> A = +-0.707106 (eps 1e-6); masked -> 0.
    assert by[("conv0/s0", "core", 0)].advantage == pytest.approx(0.707106, abs=1e-5)
    assert by[("conv0/s0", "core", 1)].advantage == pytest.approx(-0.707106, abs=1e-5)
    assert by[("conv0/s0", "core", 2)].advantage == 0.0
    # episodic: 1, 0, 0.5: mean 0.5, std 0.5 -> A = 1, -1, 0 (to eps).
    assert [by[("conv0/s0", "episodic", g)].advantage for g in range(3)] == pytest.approx([1, -1, 0], abs=1e-5)
    # conv0/s1: all 0.3 -> zero variance, A = 0; conv1/s2 has no rewards at all.
    assert all(by[("conv0/s1", a, g)].advantage == 0.0 for a in ("core", "episodic") for g in range(3))
    assert groups == {"groups": 6, "zero_variance": 2, "no_signal": 2}

    m = counts_to_metrics(batch_counts(samples, groups).values)
    assert m["batch/samples"] == 18
    assert m["batch/masked_no_qa"] == 6 and m["batch/masked_reward_masked"] == 1
    assert m["batch/masked_empty"] == 4 and m["batch/masked_truncated"] == 3  # one truncated is also reward-masked
    assert m["batch/trained_samples"] == 18 - 6 - 1 - 4 - 3
    assert m["batch/zero_variance_groups"] == 2
    # Scored: s0 core 1, 0; s0 episodic 1, 0, 0.5; s1 six times 0.3 -> 11 samples, sum 4.3.
    assert m["reward/mean"] == pytest.approx(4.3 / 11)
    assert m["reward/core/valid_rate"] == pytest.approx(4 / 5)  # 1, (0), 0.3 x 3
    assert m["rollout/truncated_frac"] == pytest.approx(6 / 18)
    # dominant kind counted once per scored candidate: s0 g0..g2 (g2 through episodic), s1 g0..g2
    assert m["attribution/dominant_episodic"] == 1.0


def test_a_failed_reward_call_masks_every_sample_with_its_reason():
    sessions = group_sessions(tiny_rl_rows(num_sessions=1))
    rollout = _rollout(sessions, [2, 2])
    requests = build_requests(sessions, rollout)
    samples = collect_samples(sessions, rollout, requests, [None], failure="reward failed: judge down")
    assert {s.mask for s in samples} == {MaskReason.REWARD_FAILED}
    assert {s.mask_detail for s in samples} == {"reward failed: judge down"}
    assert all(s.reward is None for s in samples)
    groups = assign_advantages(samples, 2)
    assert groups["no_signal"] == 2 and all(s.advantage == 0.0 for s in samples)
    assert math.isnan(counts_to_metrics(batch_counts(samples, groups).values)["reward/mean"])


def test_tis_weights_token_and_sequence_level_with_cap():
    trainer = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    engine = torch.tensor([-1.5, -1.0, -0.5, -3.2])
    seq = torch.tensor([0, 0, 1, 1])
    # token: exp(0.5) = 1.648721, exp(-1) = 0.367879, exp(0) = 1, exp(0.2) = 1.221403; cap 1.5.
    w = tis_weights(trainer, engine, seq, 2, TISLevel.TOKEN, cap=1.5)
    torch.testing.assert_close(w, torch.tensor([1.5, 0.367879, 1.0, 1.221403]), atol=1e-6, rtol=0)
    # sequence: exp(0.5 - 1) = 0.606531 on seq 0, exp(0 + 0.2) = 1.221403 on seq 1.
    w = tis_weights(trainer, engine, seq, 2, TISLevel.SEQUENCE, cap=1.5)
    torch.testing.assert_close(w, torch.tensor([0.606531, 0.606531, 1.221403, 1.221403]), atol=1e-6, rtol=0)
    assert torch.equal(tis_weights(trainer, engine, seq, 2, TISLevel.OFF, cap=1.5), torch.ones(4))
