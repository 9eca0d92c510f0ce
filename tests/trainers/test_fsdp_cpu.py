"""Two-process FSDP2 on CPU (gloo), launched with `accelerate launch --multi_gpu --num_processes 2`.

One launch of this file as a worker (`python -m accelerate.commands.launch ... test_fsdp_cpu.py
--worker OUT`) runs every distributed scenario and writes its observations under OUT; the
tests below read them and compare with single-process references computed here:
  1. the decoder layers are sharded: each rank holds half of the rows of each layer weight;
  2. SFT with 2 x 2 examples per step gives the same losses and final weights as one process
     with 4 examples per step, also across a checkpoint + resume in the middle, and exactly those
     of the same two-process run without the interruption;
  3. `full_state_dict` equals the unsharded parameters (`DTensor.full_tensor()`) and the loaded
     weights, and the HF checkpoint saved under FSDP loads with `from_pretrained` and matches;
  4. the toy GRPO loop raises the mean reward under FSDP2;
  5. checkpoints hold model + optimizer state sharded (torch.distributed.checkpoint): each rank
     wrote one file, and loading one reads this rank's file only, into DTensor shards; one
     process resumes the same checkpoint with whole tensors, exactly.
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

    from trainers.checkpoint import load_checkpoint
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

    # (5) Load the final checkpoint again (it equals the current state), noting which stored
    # items DCP's file reader reads, from which file (its private `_slice_file` sees each one).
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    checkpoint = Path(second.checkpoint)
    read: dict[str, int] = {}
    slice_file = FileSystemReader._slice_file

    def counting_slice_file(self, stream, item):
        read[item.relative_path] = read.get(item.relative_path, 0) + item.length
        return slice_file(self, stream, item)

    FileSystemReader._slice_file = counting_slice_file
    try:
        load_checkpoint(checkpoint, model=model, optimizer=resumed.torch_optimizer, scheduler=resumed.scheduler)
    finally:
        FileSystemReader._slice_file = slice_file
    # The full optimizer state, for the one-process resume of this checkpoint (test below).
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full_optim = get_optimizer_state_dict(
        model, resumed.torch_optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if rank == 0:
        torch.save(full_optim, out / "final_optim.pt")
    up_proj = model.model.layers[0].mlp.up_proj.weight
    exp_avg = resumed.torch_optimizer.state[up_proj]["exp_avg"]
    (out / f"resume-rank{rank}.json").write_text(
        json.dumps(
            {
                "read_bytes": read,
                "files": {f.name: f.stat().st_size for f in sorted(checkpoint.rglob("*")) if f.is_file()},
                "exp_avg_dtensor": isinstance(exp_avg, DTensor),
                "exp_avg_full": list(exp_avg.shape),
                "exp_avg_local": list(exp_avg.to_local().shape) if isinstance(exp_avg, DTensor) else None,
                "trainable_params": sum(p.numel() for p in model.parameters()),
            }
        )
    )

    # (3b) After training: full_state_dict against the unsharded parameters.
    final = full_state_dict(model)
    unsharded = {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for name, p in model.named_parameters()
    }
    # (6) The same run under FSDP2 without the interruption, for the exactness of the resume.
    uninterrupted = SFTTrainer(_sft_config(model_path, out / "sft_uninterrupted", batch_size=2, max_steps=SFT_STEPS))
    uninterrupted_losses = uninterrupted.train().losses
    uninterrupted.close()
    uninterrupted_params = {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for name, p in uninterrupted.unwrapped_model.named_parameters()
    }
    if rank == 0:
        torch.save(
            {"full_state_dict": final, "unsharded": unsharded, "uninterrupted": uninterrupted_params}, out / "final.pt"
        )
        (out / "sft.json").write_text(
            json.dumps(
                {
                    "uninterrupted_losses": uninterrupted_losses,
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
        shutdown(failed=True)
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


@pytest.mark.slow
def test_checkpoint_state_is_sharded_and_each_rank_reads_its_own_shard(fsdp_run):
    out, _ = fsdp_run
    ranks = [json.loads((out / f"resume-rank{r}.json").read_text()) for r in (0, 1)]
    files = ranks[0]["files"]
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= files.keys()
    assert "optimizer.pt" not in files  # no full optimizer state is written any more
    params = ranks[0]["trainable_params"]  # 525,056 (see test_fsdp_grad_sync.TINY_PARAMS)
    # Each rank's file: its half of the weights (the tied head once) and of AdamW's two moments
    # (float32), i.e. 3 * 4 bytes * params / 2 = 6 bytes per parameter, plus the replicated `step`
    # counters (24 scalars, in one of the files) and about 1.5 KB of torch.save framing for each
    # of its at most 24 + 3 * 24 items.
    for r in (0, 1):
        own = files[f"__{r}_0.distcp"]
        assert 6 * params <= own < 6 * params + 96 * 2_000, (r, own)
    for r, seen in enumerate(ranks):
        # The loaded moments are DTensor shards: up_proj [384, 128] -> [192, 128] on each rank.
        assert seen["exp_avg_dtensor"] and seen["exp_avg_full"] == [384, 128] and seen["exp_avg_local"] == [192, 128]
        # It read all of its own file and, of the other file, at most the replicated `step`
        # counters (24 scalar tensors, stored once): not the other rank's shard.
        own, other = f"__{r}_0.distcp", f"__{1 - r}_0.distcp"
        assert seen["read_bytes"][own] == files[own]
        assert seen["read_bytes"].get(other, 0) < 0.05 * files[other]
        # The previous format read the full optimizer state on every rank: 2 moments * 4 bytes
        # * params = 8 bytes per parameter (4.2 MB here); now 6 per parameter (3.5 MB).
        assert sum(seen["read_bytes"].values()) < 8 * params


@pytest.mark.slow
def test_two_process_resume_is_exact(fsdp_run):
    out, _ = fsdp_run
    sft = json.loads((out / "sft.json").read_text())
    # Saved at step 4 and resumed from the sharded checkpoint: bit-identical losses and weights.
    assert sft["losses"] == sft["uninterrupted_losses"] and len(sft["losses"]) == SFT_STEPS
    final = torch.load(out / "final.pt", weights_only=True)
    for name, value in final["uninterrupted"].items():
        assert torch.equal(final["unsharded"][name], value), name


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_in_one_process(fsdp_run, tmp_path):
    """DCP reshards: one process reads both ranks' shards into whole tensors, exactly."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from trainers.sft import SFTTrainer

    out, model_path = fsdp_run
    sft = json.loads((out / "sft.json").read_text())
    cfg = _sft_config(model_path, tmp_path, batch_size=4, max_steps=SFT_STEPS)  # same global batch of 4
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = SFTTrainer(replace(cfg, checkpoint=replace(cfg.checkpoint, resume=sft["final_checkpoint"])))
        trainer.close()
    finally:
        torch.set_num_threads(threads)
    assert trainer.state.step == SFT_STEPS
    final = torch.load(out / "final.pt", weights_only=True)["unsharded"]
    for name, p in trainer.unwrapped_model.named_parameters():
        assert torch.equal(p.detach(), final[name]), name
    expected = torch.load(out / "final_optim.pt", weights_only=True)["state"]
    got = get_optimizer_state_dict(
        trainer.unwrapped_model, trainer.torch_optimizer, options=StateDictOptions(full_state_dict=True)
    )["state"]
    assert got.keys() == expected.keys() and len(got) == 24  # every parameter, the tied head once
    for name, state in expected.items():
        assert state.keys() == got[name].keys() == {"step", "exp_avg", "exp_avg_sq"}
        for key, value in state.items():
            assert torch.equal(got[name][key], value), (name, key)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker_main(Path(sys.argv[2]), Path(sys.argv[3]))
