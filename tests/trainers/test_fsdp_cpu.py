"""Two-process FSDP2 on CPU (gloo), launched with `accelerate launch --multi_gpu --num_processes 2`.

One launch of this file as a worker (`python -m accelerate.commands.launch ... test_fsdp_cpu.py
--worker OUT`) runs every distributed scenario and writes its observations under OUT; the
tests below read them and compare with single-process references computed here:
  1. the decoder layers are sharded: each rank holds half of the rows of each layer weight;
  2. SFT with 2 x 2 examples per step gives the same losses and final weights as one process
     with 4 examples per step, also across a checkpoint + resume in the middle;
  3. `full_state_dict` equals the unsharded parameters (`DTensor.full_tensor()`) and the loaded
     weights, and the HF checkpoint saved under FSDP loads with `from_pretrained` and matches;
  4. the toy GRPO loop raises the mean reward under FSDP2.
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
SFT_STEPS, RESUME_AT = 6, 4
GRPO_STEPS = 20


def _sft_config(model_path: Path, output_dir: Path, batch_size: int, max_steps: int):
    from trainers.config import SFTConfig, load_config

    return load_config(
        SFTConfig,
        overrides=[
            f"model.path={model_path}",
            f"checkpoint.output_dir={output_dir}",
            f"train.batch_size={batch_size}",
            f"train.max_steps={max_steps}",
            "optim.lr=3e-3",
            "optim.warmup_steps=1",
            "distributed.fsdp=true",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
        ],
    )


# ---------------------------------------------------------------------------------------------
# The worker (runs in each of the two launched processes)
# ---------------------------------------------------------------------------------------------


def _worker_sft(out: Path, model_path: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    from trainers.distributed import full_state_dict
    from trainers.sft import SFTTrainer

    cfg = _sft_config(model_path, out / "sft", batch_size=2, max_steps=SFT_STEPS)
    trainer = SFTTrainer(cfg)  # creates the accelerator and so the process group
    rank = dist.get_rank()
    model = trainer.unwrapped_model
    if not trainer.accelerator.is_fsdp2:
        raise RuntimeError("the accelerator did not switch to FSDP2")

    # (1) What this rank holds of the first decoder layer.
    layer = model.model.layers[0]
    shards = {
        name: {
            "dtensor": isinstance(p, DTensor),
            "shard0": isinstance(p, DTensor) and p.placements == (Shard(0),),
            "full": list(p.shape),
            "local": list(p.to_local().shape) if isinstance(p, DTensor) else list(p.shape),
        }
        for name, p in layer.named_parameters()
    }
    (out / f"shards-rank{rank}.json").write_text(json.dumps(shards))

    # (3a) Before training: the gathered state dict equals the weights on disk.
    initial = full_state_dict(model)
    if rank == 0:
        torch.save(initial, out / "initial_full_sd.pt")

    first = trainer.train(stop_at=RESUME_AT)
    trainer.close()
    resumed = SFTTrainer(replace(cfg, checkpoint=replace(cfg.checkpoint, resume="latest")))
    second = resumed.train()
    resumed.close()
    model = resumed.unwrapped_model

    # (3b) After training: full_state_dict against the unsharded parameters.
    final = full_state_dict(model)
    unsharded = {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for name, p in model.named_parameters()
    }
    if rank == 0:
        torch.save({"full_state_dict": final, "unsharded": unsharded}, out / "final.pt")
        (out / "sft.json").write_text(
            json.dumps(
                {
                    "losses": first.losses + second.losses,
                    "first_checkpoint": str(first.checkpoint),
                    "final_checkpoint": str(second.checkpoint),
                    "resumed_step": RESUME_AT,
                }
            )
        )


def _worker_grpo(out: Path) -> None:
    import torch.distributed as dist

    from trainers.config import DistributedConfig
    from trainers.distributed import make_accelerator
    from tests.trainers.grpo_toy import run_toy_grpo
    from trainers.tiny import build_tiny_policy

    model, tokenizer = build_tiny_policy(seed=0)
    accelerator = make_accelerator(DistributedConfig(fsdp=True))
    target_ids = tokenizer.convert_tokens_to_ids(["Ġthe", "Ġand"])
    result = run_toy_grpo(
        model, tokenizer, steps=GRPO_STEPS, target_ids=target_ids, accelerator=accelerator, seed=0
    )
    if dist.get_rank() == 0:
        (out / "grpo.json").write_text(json.dumps({"mean_rewards": result.mean_rewards}))


def _worker_main(out: Path, model_path: Path) -> None:
    from trainers.distributed import exit_launched_process, shutdown

    try:
        _worker_sft(out, model_path)
        _worker_grpo(out)
    except BaseException:
        shutdown()
        raise
    exit_launched_process(0)


# ---------------------------------------------------------------------------------------------
# The tests (run in the pytest process)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """Launch the two-process worker once; returns (worker output dir, base model path)."""
    from trainers.tiny import save_tiny_policy

    root = tmp_path_factory.mktemp("fsdp")
    model_path = save_tiny_policy(root / "base_model", seed=0)
    out = root / "out"
    out.mkdir()
    launch_two_processes(__file__, [out, model_path], timeout_s=LAUNCH_TIMEOUT_S, what="FSDP run")
    return out, model_path


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, fsdp_run):
    """Single process, 4 examples per step, same model, data order and schedule; no interruption."""
    from trainers.sft import SFTTrainer

    _, model_path = fsdp_run
    cfg = _sft_config(model_path, tmp_path_factory.mktemp("reference"), batch_size=4, max_steps=SFT_STEPS)
    # One intra-op thread, like each launched worker (torchrun sets OMP_NUM_THREADS=1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = SFTTrainer(cfg)
        result = trainer.train()
        trainer.close()
    finally:
        torch.set_num_threads(threads)
    params = {n: p.detach().clone() for n, p in trainer.unwrapped_model.named_parameters()}
    return result.losses, params


@pytest.mark.slow
def test_decoder_layers_are_sharded_across_the_two_ranks(fsdp_run):
    out, _ = fsdp_run
    ranks = [json.loads((out / f"shards-rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) == 11  # q,k,v,o, q/k norms, 3 MLP, 2 layer norms
    for name, info in ranks[0].items():
        assert info["dtensor"] and info["shard0"], name
        # Dim 0 split in two halves (all sizes are even): e.g. up_proj [384, 128] -> [192, 128].
        for r in (0, 1):
            full, local = ranks[r][name]["full"], ranks[r][name]["local"]
            assert local == [full[0] // 2, *full[1:]], (name, r, full, local)


@pytest.mark.slow
def test_two_process_sft_matches_single_process(fsdp_run, reference_run):
    out, _ = fsdp_run
    ref_losses, ref_params = reference_run
    sft = json.loads((out / "sft.json").read_text())
    assert len(sft["losses"]) == len(ref_losses) == SFT_STEPS
    # Same global batch, same token-mean loss; only summation order differs.
    torch.testing.assert_close(torch.tensor(sft["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5)
    assert ref_losses[-1] < ref_losses[0] - 0.5  # and it did learn
    final = torch.load(out / "final.pt", weights_only=True)["unsharded"]
    assert final.keys() == ref_params.keys()
    for name, ref in ref_params.items():
        torch.testing.assert_close(final[name], ref, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_full_state_dict_and_hf_checkpoint_under_fsdp(fsdp_run):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out, model_path = fsdp_run
    # Before training: the gathered dict is exactly what was loaded from disk.
    initial = torch.load(out / "initial_full_sd.pt", weights_only=True)
    on_disk = load_file(model_path / "model.safetensors")
    tied = "lm_head.weight"  # tied to the embedding, so not stored in the file
    assert set(initial) - {tied} == set(on_disk)
    for name, value in on_disk.items():
        assert torch.equal(initial[name], value), name
    assert torch.equal(initial[tied], initial["model.embed_tokens.weight"])

    # After training: equal to the unsharded parameters gathered with DTensor.full_tensor().
    final = torch.load(out / "final.pt", weights_only=True)
    sd, unsharded = final["full_state_dict"], final["unsharded"]
    for name, value in unsharded.items():
        assert torch.equal(sd[name], value), name
    assert not torch.equal(sd["model.layers.0.mlp.up_proj.weight"], initial["model.layers.0.mlp.up_proj.weight"])

    # The HF folder written by rank 0 loads and holds the same weights.
    sft = json.loads((out / "sft.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(Path(sft["final_checkpoint"]) / "model", dtype=torch.float32)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, sd[name]), name


@pytest.mark.slow
def test_toy_grpo_learns_under_fsdp(fsdp_run):
    out, _ = fsdp_run
    rewards = json.loads((out / "grpo.json").read_text())["mean_rewards"]
    assert len(rewards) == GRPO_STEPS
    # Reward = share of sampled tokens that are " the" or " and": about 0.5% for the fresh model.
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.05
    assert last > first + 0.2, rewards

if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker_main(Path(sys.argv[2]), Path(sys.argv[3]))
