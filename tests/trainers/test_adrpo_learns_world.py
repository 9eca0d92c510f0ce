"""ADRPO learns on the bundled world with the real reward: validity, reward and task reward rise.

Everything on the reward side is what a real run uses: `prepare_world` (world expert, exact QA,
snapshots of the states before), `trainers.engines.build_reward` (reward library, extractive
answerer, rule judge, validity gate, expert-length penalty, attribution alpha 4), the transformers
rollout engine, the dense session episodes. The prompts and the starting policy are shrunk so
that a 0.5M-parameter model on one CPU core shows it within minutes (`trainers.tiny_world`:
short keyed prompts; a warm start that samples the own expert's operations, another session's,
or broken JSON).

Measured on the development machine (16 steps of 6 sessions x 2 agents x G = 8): mean reward
0.062 -> 0.163, validity 0.43 -> 0.98, task reward 0.142 -> 0.167 (first -> last step). The same
run under two-process FSDP2 (this file's `--worker` mode, 3 sessions per process) must show it too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

WORLD_CONVERSATIONS, WORLD_SESSIONS = 2, 3
SESSIONS = WORLD_CONVERSATIONS * WORLD_SESSIONS
AGENTS = ["episodic", "semantic"]
SFT_STEPS, SFT_LR = 2000, 1e-2
RL_STEPS, G = 16, 8


def _rows(data: Path):
    from trainers.data.rl_rows import read_rl_rows
    from trainers.tiny_world import keyed_rows

    return keyed_rows(read_rl_rows(data / "rl.parquet").rows, AGENTS)


def _config(start: Path, data: Path, out: Path, *extra: str):
    from tests.trainers.adrpo_helpers import tiny_config

    return tiny_config(
        start, out,
        f"data.snapshots={data / 'snapshots'}", "data.agents=" + json.dumps(AGENTS),
        f"data.sessions_per_step={SESSIONS}",  # every session every step: no draw noise
        f"train.max_steps={RL_STEPS}", f"rollout.group_size={G}", "rollout.max_tokens=160", "optim.lr=2e-3",
        "loss.beta=0", "checkpoint.every_steps=0", *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """The world data (keyed prompts) and the warm-started policy, shared by both tests."""
    from trainers.prepare_data import prepare_world
    from trainers.tiny import save_tiny_policy
    from trainers.tiny_world import warm_start

    root = tmp_path_factory.mktemp("world_learning")
    base = save_tiny_policy(root / "base", seed=0)
    prepare_world(root / "data", conversations=WORLD_CONVERSATIONS, sessions=WORLD_SESSIONS,
                  tokenizer=str(base), heldout_fraction=0.0)  # fmt: skip
    rows = _rows(root / "data")
    assert len({(r.conversation_id, r.session_id) for r in rows}) == SESSIONS
    return root, warm_start(base, rows, root / "start", steps=SFT_STEPS, lr=SFT_LR)


def _check_it_learned(metrics: list[dict], *, task_margin: float) -> None:
    def first_last(key):
        values = [m[key] for m in metrics]
        return sum(values[:4]) / 4, sum(values[-4:]) / 4

    assert len(metrics) == RL_STEPS
    # Every sample was scored by the reward library; nothing masked.
    assert all(m["batch/samples"] == SESSIONS * len(AGENTS) * G for m in metrics)
    assert all(m["batch/masked_reward_failed"] == 0 and m["batch/masked_reward_masked"] == 0 for m in metrics)
    valid, reward, task = first_last("reward/valid_rate"), first_last("reward/mean"), first_last("reward/task_mean")
    assert valid[1] > valid[0] + 0.3, [m["reward/valid_rate"] for m in metrics]
    assert reward[1] > reward[0] + 0.05, [m["reward/mean"] for m in metrics]
    assert task[1] > task[0] + task_margin, [m["reward/task_mean"] for m in metrics]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_adrpo_raises_validity_reward_and_task_reward_on_the_world(warm, tmp_path):
    from trainers.adrpo import ADRPOTrainer

    root, start = warm
    trainer = ADRPOTrainer(_config(start, root / "data", tmp_path / "rl"), rows=_rows(root / "data"))
    try:
        metrics = trainer.train().metrics  # the configured in-process reward: real, offline
    finally:
        trainer.close()
    _check_it_learned(metrics, task_margin=0.01)


def _worker(out: Path, start: Path, data: Path) -> None:
    import torch.distributed as dist

    from trainers.adrpo import ADRPOTrainer

    trainer = ADRPOTrainer(_config(start, data, out, "distributed.fsdp=true"), rows=_rows(data))
    try:
        metrics = trainer.train().metrics  # summed over both processes
        assert trainer.accelerator.is_fsdp2
    finally:
        trainer.close()
    if dist.get_rank() == 0:
        (out / "metrics.json").write_text(json.dumps(metrics))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_adrpo_learns_the_world_under_two_process_fsdp2(warm, tmp_path):
    from tests.trainers.launch import launch_two_processes

    root, start = warm
    out = tmp_path / "fsdp"
    launch_two_processes(__file__, [out, start, root / "data"], timeout_s=1100, what="world learning")
    # Each process rolls out 3 of the 6 sessions with its own seeds, so the run is not the single
    # process's number for number: the direction must be the same.
    _check_it_learned(json.loads((out / "metrics.json").read_text()), task_margin=0.0)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    from trainers.distributed import exit_launched_process, shutdown

    try:
        _worker(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    except BaseException:
        shutdown(failed=True)
        raise
    exit_launched_process(0)
