"""A launched two-process ADRPO run killed mid-step (launcher and both workers, SIGKILL) resumes
with `checkpoint.resume=latest` exactly: the same step count, the same data order and samples as an
uninterrupted run, the rollout engine re-synced from the checkpoint, no metric row written twice.

The workers are this file's `--worker` mode under `accelerate launch` (FSDP2 over gloo on CPU). The
killed run stops inside step 4, after its rollout and reward, before its update: rows 1-3 are
in metrics.jsonl, the newest complete checkpoint is step 2.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.trainers.launch import REPO, errors_of, launch_two_processes

LAUNCH_TIMEOUT_S = 420
STEPS = 4
KILL_IN_STEP = 4  # 1-based


def _overrides(out: Path, model_path: Path, *extra: str) -> list[str]:
    return [
        f"train.max_steps={STEPS}", "checkpoint.every_steps=2", "checkpoint.keep_last=0", "optim.lr=1e-2",
        "distributed.fsdp=true", "data.sessions_per_step=2", "loss.beta=0", *extra,
    ]  # fmt: skip


def _worker(out: Path, model_path: Path, mode: str) -> None:
    import faulthandler

    import torch.distributed as dist

    # A worker that hangs (e.g. in a collective the other one never joins) prints every thread's
    # stack and exits, so the test fails with the place instead of a timeout.
    faulthandler.dump_traceback_later(float(os.environ.get("KILL_TEST_HANG_S", 240)), exit=True)
    from transformers import AutoTokenizer

    from tests.trainers.adrpo_helpers import TargetTokenReward, tiny_config, tiny_rl_rows
    from trainers.adrpo import ADRPOTrainer
    from trainers.distributed import full_state_dict

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    extra = ("checkpoint.resume=latest",) if mode == "resume" else ()
    cfg = tiny_config(model_path, out, *_overrides(out, model_path, *extra))
    trainer = ADRPOTrainer(cfg, reward_fn=TargetTokenReward(tokenizer), rows=tiny_rl_rows(num_sessions=8))
    rank = dist.get_rank()
    if mode == "resume":
        # The engine (one transformers engine per process) holds the checkpoint's weights, which
        # differ from the base model's after two steps at lr 1e-2.
        from safetensors.torch import load_file

        policy = full_state_dict(trainer.unwrapped_model)  # collective; the full dict on rank 0
        if rank == 0:
            engine = dict(trainer.engine.model.named_parameters())
            start = load_file(str(model_path / "model.safetensors"))
            shared = [n for n in engine if n in policy and n in start]
            assert shared, (sorted(engine)[:3], sorted(policy)[:3])
            (out / "resume_check.json").write_text(json.dumps({
                "step": trainer.state.step,
                "engine_vs_policy": max(float((engine[n].detach() - policy[n]).abs().max()) for n in shared),
                "engine_vs_base": max(float((engine[n].detach() - start[n]).abs().max()) for n in shared),
            }))
    if mode == "killed":
        collect = trainer.episodes.collect

        def collect_then_hang(indices, engine, params, *, step):
            episodes = collect(indices, engine, params, step=step)
            if step == KILL_IN_STEP:
                (out / f"hang-{rank}").write_text("in step 4, after rollout and reward")
                time.sleep(600)  # the test kills the whole process group here
            return episodes

        trainer.episodes.collect = collect_then_hang
    try:
        trainer.train()
    finally:
        trainer.close()


def _launch_and_kill(out: Path, model_path: Path) -> None:
    """Start the run, wait until both workers hang inside step 4, SIGKILL the launcher and workers."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_port()), __file__, "--worker", str(out), str(model_path), "killed",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log_path = out.parent / "killed.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while not all((out / f"hang-{r}").exists() for r in (0, 1)):
            if proc.poll() is not None:
                pytest.fail(f"the run ended before it could be killed ({proc.returncode}):\n{errors_of(log_path.read_text())}")
            if time.monotonic() > deadline:
                pytest.fail(f"the run never reached step {KILL_IN_STEP}:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)  # launcher and both workers, as an OOM killer or scancel would
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # Nothing of the group survives.
    alive = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert not alive, f"processes of the killed run still alive: {alive}"


def _port() -> int:
    from tests.trainers.launch import free_port

    return free_port()


@pytest.mark.slow
@pytest.mark.timeout(1200)  # three 2-process launches; slow on a loaded 2-core machine
def test_a_killed_two_process_run_resumes_exactly(tmp_path):
    from trainers.metrics import read_metrics
    from trainers.tiny import save_tiny_policy

    model_path = save_tiny_policy(tmp_path / "model", seed=0)
    full, killed = tmp_path / "full", tmp_path / "killed"
    killed.mkdir()
    launch_two_processes(__file__, [full, model_path, "full"], timeout_s=LAUNCH_TIMEOUT_S, what="uninterrupted run")
    _launch_and_kill(killed, model_path)

    # Killed inside step 4: rows 1-3 were logged, step 4's checkpoint never started.
    assert [r["step"] for r in read_metrics(killed)] == [1, 2, 3]
    assert sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith("step-")) == ["step-000002"]

    launch_two_processes(__file__, [killed, model_path, "resume"], timeout_s=LAUNCH_TIMEOUT_S, what="resumed run")
    check = json.loads((killed / "resume_check.json").read_text())
    assert check["step"] == 2
    assert check["engine_vs_policy"] == 0.0  # the engine was synced from the checkpoint ...
    assert check["engine_vs_base"] > 1e-3  # ... which is not the base model

    reference, rows = read_metrics(full), read_metrics(killed)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # no row twice, none missing
    for ref, got in zip(reference, rows, strict=True):
        # Same sessions in the same order, same samples (seeded per step and rank), same weights.
        assert got["reward/mean"] == ref["reward/mean"], (ref["step"], ref["reward/mean"], got["reward/mean"])
        assert got["batch/samples"] == ref["batch/samples"]
        assert got["train/loss"] == pytest.approx(ref["train/loss"], abs=1e-6)
    assert json.loads((killed / "checkpoints" / "step-000004" / "trainer_state.json").read_text())["step"] == STEPS


if __name__ == "__main__" and "--worker" in sys.argv:
    i = sys.argv.index("--worker")
    out, model, mode = Path(sys.argv[i + 1]), Path(sys.argv[i + 2]), sys.argv[i + 3]
    out.mkdir(parents=True, exist_ok=True)
    from trainers.distributed import exit_launched_process, shutdown

    try:
        _worker(out, model, mode)
    except BaseException:
        import traceback

        traceback.print_exc()
        shutdown(failed=True)
        raise
    exit_launched_process(0)
