"""ADRPO under two-process FSDP2 on CPU (gloo), launched with `accelerate launch --num_processes 2`.

One launch of this file as a worker runs both scenarios and writes what it saw under OUT:
  1. gradients: each process holds two of the four groups of a fixed batch, in two micro-batches;
     the gathered gradient must equal one process with all four groups in four micro-batches
     (the loss is normalised by the step's global token count across micro-batches and ranks);
  2. learning: the trainer (FSDP2 policy, sharded reference, activation checkpointing) raises the
     mean reward and validity on the small target-token task.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.trainers.launch import launch_two_processes

LAUNCH_TIMEOUT_S = 420
STEPS = 16


def _grad_config(model_path: Path, out: Path, budget: int):
    from tests.trainers.adrpo_helpers import tiny_config

    cfg = tiny_config(model_path, out, f"loss.micro_batch_tokens={budget}", "loss.beta=0", "distributed.fsdp=true")
    return cfg


def _worker(out: Path, model_path: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from transformers import AutoTokenizer

    from tests.trainers.adrpo_helpers import TargetTokenReward, tiny_config, tiny_rl_rows
    from tests.trainers.test_adrpo import _hand_samples
    from trainers.adrpo import ADRPOTrainer
    from trainers.checkpoint import load_policy
    from trainers.distributed import make_accelerator
    from trainers.rl_step import policy_update, prepare_policy_batch

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # (1) gradients of one pass: rank r takes groups 2r and 2r + 1, one per micro-batch.
    cfg = _grad_config(model_path, out / "grad", budget=40)
    acc = make_accelerator(cfg.distributed)
    rank = dist.get_rank()
    model, _ = load_policy(model_path, cfg.model, cfg.lora)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model, opt = acc.prepare(model, opt)
    mine = [s for s in _hand_samples(tokenizer) if s.group // 2 == rank]
    batch = prepare_policy_batch(model, None, mine, cfg, pad_id=0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    policy_update(model, opt, sched, acc, batch, cfg, step=False)
    grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
             for n, p in model.named_parameters()}
    if rank == 0:
        torch.save({"grads": grads, "micro": len(batch.micro), "tokens": batch.global_tokens}, out / "grads.pt")
    opt.zero_grad(set_to_none=True)

    # (2) the trainer learns under FSDP2 with a sharded reference and activation checkpointing.
    cfg = tiny_config(
        model_path, out / "learn", f"train.max_steps={STEPS}", "optim.lr=3e-3", "rollout.group_size=8",
        "rollout.max_tokens=12", "checkpoint.every_steps=0", "distributed.fsdp=true",
        "train.gradient_checkpointing=true",
    )  # fmt: skip
    trainer = ADRPOTrainer(cfg, reward_fn=TargetTokenReward(tokenizer), rows=tiny_rl_rows())
    ref_sharded = all(isinstance(p, DTensor) for p in trainer.ref_model.parameters())
    result = trainer.train()
    trainer.close()
    if rank == 0:
        (out / "learn.json").write_text(json.dumps({
            "rewards": [m["reward/mean"] for m in result.metrics],
            "valid": [m["reward/valid_rate"] for m in result.metrics],
            "kl": [m["train/kl_mean"] for m in result.metrics],
            "ref_sharded": ref_sharded,
            "fsdp2": trainer.accelerator.is_fsdp2,
        }))


def _worker_main(out: Path, model_path: Path) -> None:
    from trainers.distributed import exit_launched_process, shutdown

    try:
        _worker(out, model_path)
    except BaseException:
        shutdown(failed=True)
        raise
    exit_launched_process(0)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    from trainers.tiny import save_tiny_policy

    root = tmp_path_factory.mktemp("adrpo_fsdp")
    model_path = save_tiny_policy(root / "base_model", seed=0)
    out = root / "out"
    out.mkdir()
    launch_two_processes(__file__, [out, model_path], timeout_s=LAUNCH_TIMEOUT_S, what="ADRPO run")
    return out, model_path


@pytest.mark.slow
def test_two_processes_times_two_micro_batches_equal_one_process_times_four(fsdp_run, tmp_path):
    from transformers import AutoTokenizer

    from tests.trainers.test_adrpo import _hand_samples
    from trainers.checkpoint import load_policy
    from trainers.distributed import make_accelerator
    from trainers.rl_step import policy_update, prepare_policy_batch

    out, model_path = fsdp_run
    got = torch.load(out / "grads.pt", weights_only=True)
    assert got["micro"] == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = _grad_config(model_path, tmp_path, budget=40)
        cfg = replace(cfg, distributed=replace(cfg.distributed, fsdp=False))
        model, _ = load_policy(model_path, cfg.model, cfg.lora)
        samples = _hand_samples(AutoTokenizer.from_pretrained(model_path))
        batch = prepare_policy_batch(model, None, samples, cfg, pad_id=0)
        assert len(batch.micro) == 4 and batch.global_tokens == got["tokens"]
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        policy_update(model, opt, sched, make_accelerator(cfg.distributed), batch, cfg, step=False)
    finally:
        torch.set_num_threads(threads)
    reference = {n: p.grad for n, p in model.named_parameters()}
    assert reference.keys() == got["grads"].keys()
    for name, g in reference.items():
        scale = g.abs().max().clamp(min=1e-12)
        torch.testing.assert_close(got["grads"][name] / scale, g / scale, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_adrpo_learns_under_fsdp2_with_a_sharded_reference(fsdp_run):
    out, _ = fsdp_run
    seen = json.loads((out / "learn.json").read_text())
    assert seen["fsdp2"] and seen["ref_sharded"]
    rewards, valid = seen["rewards"], seen["valid"]
    assert len(rewards) == STEPS
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert first < 0.1 and last > first + 0.2, rewards
    assert sum(valid[-4:]) / 4 > sum(valid[:4]) / 4 + 0.2, valid
    assert seen["kl"][0] == pytest.approx(0.0, abs=1e-6) and max(seen["kl"]) > 0  # the policy left the reference


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker_main(Path(sys.argv[2]), Path(sys.argv[3]))
