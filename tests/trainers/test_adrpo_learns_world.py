"""ADRPO learns on the bundled world with the real reward: validity, reward and task reward rise.

Everything on the reward side is what a real run uses: `prepare_world` (world expert, exact QA,
snapshots of the states before), `trainers.engines.build_reward` (reward library, extractive
answerer, rule judge, validity gate, expert-length penalty, attribution alpha 4), the transformers
rollout engine, the dense session episodes. The prompts and the starting policy are shrunk so
that a 0.5M-parameter model on one CPU core shows it within minutes (`trainers.tiny_world`:
short keyed prompts; a warm start that samples the own expert's operations, another session's,
or broken JSON).

Measured on the development machine (16 steps of 6 sessions x 2 agents x G = 8): mean reward
0.062 -> 0.163, validity 0.43 -> 0.98, task reward 0.142 -> 0.167 (first -> last step).
"""

from __future__ import annotations

import pytest

WORLD_CONVERSATIONS, WORLD_SESSIONS = 2, 3
AGENTS = ["episodic", "semantic"]
SFT_STEPS, SFT_LR = 2000, 1e-2
RL_STEPS = 16


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_adrpo_raises_validity_reward_and_task_reward_on_the_world(tmp_path):
    from tests.trainers.adrpo_helpers import tiny_config
    from trainers.adrpo import ADRPOTrainer
    from trainers.data.rl_rows import read_rl_rows
    from trainers.prepare_data import prepare_world
    from trainers.tiny import save_tiny_policy
    from trainers.tiny_world import keyed_rows, warm_start

    base = save_tiny_policy(tmp_path / "base", seed=0)
    prepare_world(tmp_path / "data", conversations=WORLD_CONVERSATIONS, sessions=WORLD_SESSIONS,
                  tokenizer=str(base), heldout_fraction=0.0)  # fmt: skip
    rows = keyed_rows(read_rl_rows(tmp_path / "data" / "rl.parquet").rows, AGENTS)
    sessions = {(r.conversation_id, r.session_id) for r in rows}
    assert len(sessions) == WORLD_CONVERSATIONS * WORLD_SESSIONS
    start = warm_start(base, rows, tmp_path / "start", steps=SFT_STEPS, lr=SFT_LR)

    cfg = tiny_config(
        start, tmp_path / "rl",
        f"data.snapshots={tmp_path / 'data' / 'snapshots'}", f"data.agents={AGENTS}".replace("'", '"'),
        f"data.sessions_per_step={len(sessions)}",  # every session every step: no draw noise
        f"train.max_steps={RL_STEPS}", "rollout.group_size=8", "rollout.max_tokens=160", "optim.lr=2e-3",
        "loss.beta=0", "checkpoint.every_steps=0",
    )  # fmt: skip
    trainer = ADRPOTrainer(cfg, rows=rows)  # the configured in-process reward: real, offline
    try:
        metrics = trainer.train().metrics
    finally:
        trainer.close()

    def first_last(key):
        values = [m[key] for m in metrics]
        return sum(values[:4]) / 4, sum(values[-4:]) / 4

    # Every sample was scored by the reward library; nothing masked.
    assert all(m["batch/samples"] == len(sessions) * len(AGENTS) * 8 for m in metrics)
    assert all(m["batch/masked_reward_failed"] == 0 and m["batch/masked_reward_masked"] == 0 for m in metrics)
    valid, reward, task = first_last("reward/valid_rate"), first_last("reward/mean"), first_last("reward/task_mean")
    assert valid[1] > valid[0] + 0.3, [m["reward/valid_rate"] for m in metrics]
    assert reward[1] > reward[0] + 0.05, [m["reward/mean"] for m in metrics]
    assert task[1] > task[0] + 0.01, [m["reward/task_mean"] for m in metrics]
