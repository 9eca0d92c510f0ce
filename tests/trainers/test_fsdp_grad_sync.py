"""Gradient accumulation under two-process FSDP2 on CPU: sharded (default) versus `no_sync`.

One launch of this file as a worker runs one SFT step (2 processes x 2 micro-batches of 1
example) in each `distributed.grad_accum_sync` mode and records, on each rank, the gathered
gradient before the optimizer step and the gradient bytes the rank holds at each micro-batch's
forward. The tests check that
  1. both modes give the gradient of one process taking the 4 examples at once;
  2. "every_micro_batch" holds only the rank's half of the gradient between micro-batches, while
     "last_micro_batch" (no_sync) holds the full unsharded gradient of every parameter.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.trainers.launch import launch_two_processes

LAUNCH_TIMEOUT_S = 300
MODES = ("every_micro_batch", "last_micro_batch")
GLOBAL_BATCH = [0, 1, 2, 3]  # indices into the built-in pairs
# Parameters of the tiny Qwen3 (hidden 128, 2 layers, 4 heads / 2 KV heads of 32, MLP 384,
# vocabulary 1024, tied head), each counted once:
#   per layer: q 128*128 + k 128*64 + v 128*64 + o 128*128 = 49,152; q/k norms 32 + 32;
#              MLP 3 * 128*384 = 147,456; two layer norms 2 * 128  -> 196,928
#   2 layers 393,856 + embedding (= head) 1024*128 = 131,072 + final norm 128 -> 525,056
TINY_PARAMS = 525_056
FULL_GRAD_BYTES = TINY_PARAMS * 4  # float32: 2,100,224 bytes


def _config(model_path: Path, output_dir: Path, *, mode: str, batch_size: int, accum: int, fsdp: bool):
    from trainers.config import SFTConfig, load_config

    return load_config(
        SFTConfig,
        overrides=[
            f"model.path={model_path}",
            f"checkpoint.output_dir={output_dir}",
            f"train.batch_size={batch_size}",
            f"train.grad_accum_steps={accum}",
            "train.max_steps=1",
            "optim.max_grad_norm=0",  # no clipping: the recorded gradient is the raw one
            f"distributed.fsdp={str(fsdp).lower()}",
            f"distributed.grad_accum_sync={mode}",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
        ],
    )


def _record_step(trainer) -> dict:
    """Run one train_step on GLOBAL_BATCH; record gradient bytes at each forward and the full gradient."""
    from torch.distributed.tensor import DTensor

    from trainers.distributed import gradient_bytes

    model = trainer.unwrapped_model
    seen: dict = {"at_forward": []}

    def before_forward(module, args, kwargs):
        seen["at_forward"].append(gradient_bytes(model))

    handle = model.register_forward_pre_hook(before_forward, with_kwargs=True)
    optimizer_step = trainer.optimizer.step

    def step(*args, **kwargs):
        seen["at_step"] = gradient_bytes(model)
        seen["grads"] = {
            n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
            for n, p in model.named_parameters()
        }
        return optimizer_step(*args, **kwargs)

    trainer.optimizer.step = step
    try:
        seen["loss"] = trainer.train_step(GLOBAL_BATCH)["train/loss"]
    finally:
        handle.remove()
        trainer.optimizer.step = optimizer_step
    return seen


def _worker(out: Path, model_path: Path) -> None:
    import torch.distributed as dist

    from trainers.sft import SFTTrainer

    for mode in MODES:
        trainer = SFTTrainer(_config(model_path, out / mode, mode=mode, batch_size=1, accum=2, fsdp=True))
        if not trainer.accelerator.is_fsdp2:
            raise RuntimeError("the accelerator did not switch to FSDP2")
        seen = _record_step(trainer)
        trainer.close()
        rank = dist.get_rank()
        (out / f"{mode}-rank{rank}.json").write_text(
            json.dumps({k: seen[k] for k in ("at_forward", "at_step", "loss")})
        )
        if rank == 0:
            torch.save(seen["grads"], out / f"{mode}-grads.pt")


def _worker_main(out: Path, model_path: Path) -> None:
    from trainers.distributed import exit_launched_process, shutdown

    try:
        _worker(out, model_path)
    except BaseException:
        shutdown()
        raise
    exit_launched_process(0)


@pytest.fixture(scope="module")
def grad_sync_run(tmp_path_factory):
    from trainers.tiny import save_tiny_policy

    root = tmp_path_factory.mktemp("grad_sync")
    model_path = save_tiny_policy(root / "base_model", seed=0)
    out = root / "out"
    out.mkdir()
    launch_two_processes(__file__, [out, model_path], timeout_s=LAUNCH_TIMEOUT_S, what="grad-sync run")
    return out, model_path


@pytest.fixture(scope="module")
def reference_grads(grad_sync_run, tmp_path_factory):
    """One process, the 4 examples in one micro-batch, same step."""
    from trainers.sft import SFTTrainer

    _, model_path = grad_sync_run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = _config(
            model_path, tmp_path_factory.mktemp("ref"), mode="every_micro_batch", batch_size=4, accum=1, fsdp=False
        )
        trainer = SFTTrainer(cfg)
        seen = _record_step(trainer)
        trainer.close()
    finally:
        torch.set_num_threads(threads)
    assert sum(p.numel() for p in trainer.unwrapped_model.parameters()) == TINY_PARAMS
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_both_modes_give_the_single_process_gradient(grad_sync_run, reference_grads, mode):
    out, _ = grad_sync_run
    grads = torch.load(out / f"{mode}-grads.pt", weights_only=True)
    ref = reference_grads["grads"]
    assert grads.keys() == ref.keys()
    for name, g in ref.items():
        # Relative to the tensor's largest entry: only summation order differs.
        scale = g.abs().max().clamp(min=1e-12)
        torch.testing.assert_close(grads[name] / scale, g / scale, rtol=1e-5, atol=1e-5, msg=name)
    loss = json.loads((out / f"{mode}-rank0.json").read_text())["loss"]
    assert loss == pytest.approx(reference_grads["loss"], rel=1e-6)


@pytest.mark.slow
def test_the_two_modes_agree(grad_sync_run):
    out, _ = grad_sync_run
    a, b = (torch.load(out / f"{m}-grads.pt", weights_only=True) for m in MODES)
    for name in a:
        scale = a[name].abs().max().clamp(min=1e-12)
        torch.testing.assert_close(a[name] / scale, b[name] / scale, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.slow
def test_gradient_memory_between_micro_batches(grad_sync_run):
    out, _ = grad_sync_run
    half = FULL_GRAD_BYTES // 2  # every dimension 0 is even, so each rank holds exactly half
    for rank in (0, 1):
        sharded = json.loads((out / f"every_micro_batch-rank{rank}.json").read_text())
        no_sync = json.loads((out / f"last_micro_batch-rank{rank}.json").read_text())
        # Before the first micro-batch nothing is held in either mode.
        assert sharded["at_forward"][0] == no_sync["at_forward"][0] == {"sharded": 0, "unsharded": 0}
        # Between the micro-batches: the reduce-scattered half, or the full unsharded gradient.
        assert sharded["at_forward"][1] == {"sharded": half, "unsharded": 0}
        assert no_sync["at_forward"][1] == {"sharded": 0, "unsharded": FULL_GRAD_BYTES}
        # At the optimizer step both hold only the rank's shard.
        assert sharded["at_step"] == no_sync["at_step"] == {"sharded": half, "unsharded": 0}


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker_main(Path(sys.argv[2]), Path(sys.argv[3]))
