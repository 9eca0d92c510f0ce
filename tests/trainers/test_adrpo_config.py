"""ADRPOConfig: the paper's settings as defaults, the shipped configs load, bad values are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainers.adrpo_config import ADRPOConfig
from trainers.config import ConfigError, config_to_dict, load_config
from trainers.losses import Aggregation

CONFIGS = Path(__file__).resolve().parents[2] / "trainers" / "configs"


def test_defaults_are_the_papers_run():
    cfg = ADRPOConfig()
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.max_grad_norm) == (1e-6, 0.01, 1.0)
    assert cfg.optim.schedule == "constant" and cfg.optim.warmup_steps == 0
    assert (cfg.rollout.group_size, cfg.rollout.temperature, cfg.rollout.top_p) == (8, 0.8, 0.9)
    assert (cfg.reward.alpha, cfg.reward.length_lambda) == (4.0, 0.8)
    assert (cfg.data.sessions_per_step, cfg.rollout.max_tokens, cfg.train.epochs) == (32, 6144, 5)
    assert cfg.loss.updates_per_batch == 1
    loss = cfg.loss.policy_loss_config()
    assert loss.aggregation is Aggregation.TOKEN_MEAN
    assert (loss.beta, loss.kl_clamp, loss.dual_clip, loss.eps_low, loss.eps_high) == (0.02, 10.0, 3.0, 0.2, 0.2)
    # TIS: on for vLLM and remote rollouts, off for transformers (the trainer's own code path).
    assert cfg.rollout.tis_level == "off"
    assert load_config(ADRPOConfig, overrides=["rollout.engine=vllm"]).rollout.tis_level == "token"


def test_shipped_configs_load_and_the_command_line_default_is_the_cpu_one():
    from trainers.adrpo import parse_args

    for path in sorted(CONFIGS.glob("adrpo_*.yaml")):
        load_config(ADRPOConfig, path)
    cpu = load_config(ADRPOConfig, CONFIGS / "adrpo_cpu.yaml")
    assert config_to_dict(parse_args([])) == config_to_dict(cpu)
    # Only sizes differ from the paper's defaults; the algorithm is the same.
    paper = ADRPOConfig()
    assert cpu.loss.policy_loss_config() == paper.loss.policy_loss_config() and cpu.optim == paper.optim
    assert cpu.loss.updates_per_batch == paper.loss.updates_per_batch == 1
    assert (cpu.rollout.temperature, cpu.rollout.top_p, cpu.reward.alpha) == (0.8, 0.9, 4.0)
    assert parse_args(["--resume", "latest", "optim.lr=2e-6"]).checkpoint.resume == "latest"
    paper = load_config(ADRPOConfig, CONFIGS / "adrpo_paper_gpu.yaml")
    assert (paper.data.sessions_per_step, paper.rollout.max_tokens, paper.train.epochs) == (32, 6144, 5)
    assert paper.rollout.engine == "vllm" and paper.distributed.fsdp


@pytest.mark.parametrize(
    "override, message",
    [
        ("rollout.temperature=0", "rollout.temperature"),
        ("rollout.group_size=1", "rollout.group_size"),
        ("loss.dual_clip=0.5", "dual_clip"),
        ("loss.aggregation=seq_sum_norm", "norm_length"),
        ("rollout.engine=remote", "rollout.url"),
        ("reward.kind=remote", "reward.url"),
        ("lora.enabled=true", "LoRA"),
        ("loss.updates_per_batch=0", "updates_per_batch"),
    ],
)
def test_bad_values_are_refused_with_their_name(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ADRPOConfig, overrides=[override])
