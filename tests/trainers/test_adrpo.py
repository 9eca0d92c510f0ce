"""The ADRPO trainer on a tiny model: log-prob temperatures, global normalisation, masking,
failures, resume, and that it learns a small task."""

from __future__ import annotations

import json
import math
import shutil
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from rollout.types import Completion
from tests.trainers.adrpo_helpers import TargetTokenReward, tiny_config, tiny_rl_rows
from trainers.adrpo import ADRPOTrainer
from trainers.distributed import make_accelerator
from trainers.metrics import read_metrics
from trainers.rl_batch import Sample
from trainers.rl_step import policy_update, prepare_policy_batch


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    from trainers.tiny import save_tiny_policy

    return save_tiny_policy(tmp_path_factory.mktemp("adrpo_base") / "model", seed=0)


@pytest.fixture(scope="module")
def tokenizer(base_model):
    return AutoTokenizer.from_pretrained(base_model)


def _trainer(base_model, tokenizer, out, *overrides, reward=None, rows=None) -> ADRPOTrainer:
    cfg = tiny_config(base_model, out, *overrides)
    return ADRPOTrainer(cfg, reward_fn=reward or TargetTokenReward(tokenizer), rows=rows or tiny_rl_rows())


# ---------------------------------------------------------------------------------------------
# Log-probs: the sampling temperature on both sides, the engine's only for mismatch / TIS
# ---------------------------------------------------------------------------------------------


def test_old_logprobs_at_the_sampling_temperature_give_ratio_one_on_the_first_update(base_model, tokenizer, tmp_path):
    trainer = _trainer(base_model, tokenizer, tmp_path, "rollout.temperature=0.8", "train.max_steps=1")
    try:
        cfg, model = trainer.cfg, trainer.unwrapped_model
        from trainers.rl_batch import assign_advantages

        samples = trainer._collect([0, 1]).samples
        assign_advantages(samples, cfg.rollout.group_size)
        batch = prepare_policy_batch(model, trainer.ref_model, samples, cfg, pad_id=tokenizer.pad_token_id)

        # Independent reference: full logits of one sample's sequence from a plain forward.
        s = next(x for x in samples if x.mask is None)
        seq = torch.tensor([list(s.completion.prompt_token_ids) + list(s.completion.token_ids)])
        with torch.no_grad():
            logits = model(input_ids=seq).logits[0, len(s.completion.prompt_token_ids) - 1 : -1]
        ids = torch.tensor(s.completion.token_ids)
        at_t = torch.log_softmax(logits / 0.8, -1).gather(-1, ids[:, None])[:, 0]
        at_1 = torch.log_softmax(logits, -1).gather(-1, ids[:, None])[:, 0]
        # The engine reports temperature-1 log-probs: they match the raw softmax, not logits / T.
        torch.testing.assert_close(torch.tensor(s.completion.logprobs), at_1, atol=1e-4, rtol=0)
        # The two temperatures differ here by far more than the 1e-4 tolerance used below, so the
        # comparisons can tell them apart (how much depends on the tokens drawn).
        assert (at_t - at_1).abs().max() > 1e-2
        # The trainer's old log-probs of that sample (the first trainable one: first tokens of
        # micro-batch 0) are the tempered ones.
        torch.testing.assert_close(batch.micro[0].old_logp[: len(ids)], at_t, atol=1e-4, rtol=0)
        assert batch.metrics["rollout/mismatch_abs_logp"] < 1e-4

        metrics = policy_update(model, trainer.optimizer, trainer.scheduler, trainer.accelerator, batch, cfg)
        # rho = exp(logp - logp_old) is exactly 1 on the first (only) update.
        assert metrics["train/ratio_min"] == pytest.approx(1.0, abs=1e-6)
        assert metrics["train/ratio_max"] == pytest.approx(1.0, abs=1e-6)
        assert metrics["train/clip_frac_low"] == metrics["train/clip_frac_high"] == 0.0
        assert metrics["train/kl_mean"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the step
    finally:
        trainer.close()


def test_several_updates_per_batch_make_the_ratio_move_and_clip(base_model, tokenizer, tmp_path):
    trainer = _trainer(
        base_model, tokenizer, tmp_path, "loss.updates_per_batch=4", "optim.lr=1e-2", "loss.beta=0", "train.max_steps=1"
    )
    try:
        m = trainer.train().metrics[0]
    finally:
        trainer.close()
    assert m["train/ratio_max"] > 1.2 or m["train/ratio_min"] < 0.8
    assert m["train/clip_frac_low"] + m["train/clip_frac_high"] > 0


class _ShiftedLogprobs:
    """An engine reporting every log-prob 0.5 higher than the model's (a mismatched sampler)."""

    def __init__(self, engine):
        self.engine = engine

    def generate(self, prompts, params):
        return [
            [Completion(c.prompt_token_ids, c.token_ids, tuple(x + 0.5 for x in c.logprobs), c.text, c.finish_reason)
             for c in per_prompt]
            for per_prompt in self.engine.generate(prompts, params)
        ]

    def update_weights(self, named):
        self.engine.update_weights(named)

    def close(self):
        self.engine.close()


@pytest.mark.parametrize("tis, factor", [("token", math.exp(-0.5)), ("off", 1.0)])
def test_engine_mismatch_is_measured_and_corrected_by_truncated_importance_sampling(
    base_model, tokenizer, tmp_path, tis, factor
):
    from rollout.hf_engine import HFEngine
    from trainers.rl_batch import assign_advantages

    cfg = tiny_config(base_model, tmp_path, f"rollout.tis={tis}", "train.max_steps=1")
    trainer = ADRPOTrainer(
        cfg, reward_fn=TargetTokenReward(tokenizer, alpha=4.0), rows=tiny_rl_rows(), engine=_ShiftedLogprobs(HFEngine(base_model))
    )
    try:
        samples = trainer._collect([0, 1]).samples
        assign_advantages(samples, cfg.rollout.group_size)
        batch = prepare_policy_batch(trainer.unwrapped_model, None, samples, cfg, pad_id=0)
    finally:
        trainer.close()
    # trainer - engine = -0.5 on every token: |diff| = 0.5; k3 = e^-0.5 - 1 + 0.5 = 0.106531.
    assert batch.metrics["rollout/mismatch_abs_logp"] == pytest.approx(0.5, abs=1e-4)
    assert batch.metrics["rollout/mismatch_kl"] == pytest.approx(0.106531, abs=1e-4)
    # Token-level TIS: min(e^-0.5, 2) = 0.606531 multiplies each token's attribution weight.
    trainable = [s for s in samples if s.mask is None]
    micro = batch.micro[0]
    n0 = trainable[0].num_tokens
    expected = torch.full((n0,), trainable[0].weight * factor)
    torch.testing.assert_close(micro.weights[:n0], expected, atol=1e-4, rtol=0)
    assert batch.metrics["rollout/tis_mean"] == pytest.approx(factor, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# One normaliser for the whole step
# ---------------------------------------------------------------------------------------------


def _hand_samples(tokenizer) -> list[Sample]:
    """4 groups x 3 samples of different lengths, fixed advantages and weights."""
    g = torch.Generator().manual_seed(0)
    samples = []
    for group in range(4):
        prompt = tuple(tokenizer("<|im_start|>user\nsession %d<|im_end|>\n" % group)["input_ids"])
        for index in range(3):
            n = 2 + 3 * index + group  # 2..13 tokens
            ids = tuple(torch.randint(3, 500, (n,), generator=g).tolist())
            c = Completion(prompt, ids, tuple([-6.0] * n), "", "stop")
            s = Sample(group, f"s{group}", "core", index, c, reward=0.0)
            s.advantage = float(torch.randn((), generator=g))
            s.weight = 4.0 if index == 1 else 1.0
            samples.append(s)
    return samples


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_the_same_gradient_whatever_the_micro_batch_split(base_model, tokenizer, tmp_path, aggregation):
    from trainers.checkpoint import load_policy
    from trainers.config import DistributedConfig

    samples = _hand_samples(tokenizer)
    acc = make_accelerator(DistributedConfig())
    grads = {}
    for budget in (4096, 40):  # one micro-batch, or one group per micro-batch (4)
        cfg = tiny_config(base_model, tmp_path, f"loss.micro_batch_tokens={budget}", f"loss.aggregation={aggregation}")
        model, _ = load_policy(base_model, cfg.model, cfg.lora)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        batch = prepare_policy_batch(model, None, samples, replace(cfg, loss=replace(cfg.loss, beta=0.0)), pad_id=0)
        assert len(batch.micro) == (1 if budget == 4096 else 4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        policy_update(model, opt, sched, acc, batch, replace(cfg, loss=replace(cfg.loss, beta=0.0)), step=False)
        grads[budget] = _grads(model)
    assert grads[4096].keys() == grads[40].keys() and grads[4096]
    for name, g in grads[4096].items():
        # Summation order differs between the splits: compare relative to the tensor's scale.
        scale = g.abs().max().clamp(min=1e-12)
        torch.testing.assert_close(grads[40][name] / scale, g / scale, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Masking, failures, resume
# ---------------------------------------------------------------------------------------------


class _EmptyFirstSample:
    """An engine whose first sample of every prompt has no tokens (a model that stopped at once)."""

    def __init__(self, engine):
        self.engine = engine

    def generate(self, prompts, params):
        out = self.engine.generate(prompts, params)
        return [[Completion(c[0].prompt_token_ids, (), (), "", "stop"), *c[1:]] for c in out]

    def update_weights(self, named):
        self.engine.update_weights(named)

    def close(self):
        self.engine.close()


def test_reward_failure_no_qa_and_empty_completions_are_masked_counted_and_training_goes_on(
    base_model, tokenizer, tmp_path
):
    from rollout.hf_engine import HFEngine

    reward = TargetTokenReward(tokenizer, fail_calls={0})
    rows = tiny_rl_rows(num_sessions=2) + tiny_rl_rows(num_sessions=3, qa=False)[4:]  # + session s2 without QA
    cfg = tiny_config(base_model, tmp_path, "data.sessions_per_step=3", "data.shuffle=false", "train.max_steps=2")
    engine = _EmptyFirstSample(HFEngine(base_model))
    trainer = ADRPOTrainer(cfg, reward_fn=reward, rows=rows, engine=engine)
    try:
        before = {n: p.detach().clone() for n, p in trainer.unwrapped_model.named_parameters()}
        first = trainer.train(stop_at=1).metrics[0]
        # Step 1: the reward call failed -> 2 sessions x 2 agents x 4 samples masked; the session
        # without QA was never sent (2 x 4 masked); nothing to learn, so no optimizer step.
        assert first["batch/masked_reward_failed"] == 16 and first["batch/masked_no_qa"] == 8
        assert first["train/skipped_update"] == 1.0
        assert all(torch.equal(p, before[n]) for n, p in trainer.unwrapped_model.named_parameters())
        second = trainer.train().metrics[0]
    finally:
        trainer.close()
    assert len(reward.requests) == 4 and {r.session_id for r in reward.requests} == {"s0", "s1"}
    # Step 2: scored; the first sample of each of the 4 scored groups is empty, counted, not trained.
    assert second["batch/masked_reward_failed"] == 0 and second["batch/masked_empty"] == 4
    assert second["batch/trained_samples"] == 12
    assert "train/skipped_update" not in second
    assert second["train/loss_sequences"] == 12


def test_a_reward_server_that_is_gone_stops_the_run_with_a_clear_error(base_model, tokenizer, tmp_path):
    from reward.client import RemoteReward, RewardServerError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once the socket is closed
    gone = RemoteReward(f"http://127.0.0.1:{port}", retries=1, backoff_s=0.01, connect_timeout_s=1.0, timeout_s=2.0)
    trainer = _trainer(base_model, tokenizer, tmp_path, reward=gone)
    try:
        with pytest.raises(RewardServerError, match=f"127.0.0.1:{port}"):
            trainer.train()
    finally:
        trainer.close()


def test_a_rollout_server_that_is_gone_stops_the_run_with_a_clear_error(base_model, tokenizer, tmp_path):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from rollout.client import RemoteEngine

    class Models(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = json.dumps({"data": [{"id": "tiny"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Models)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    remote = RemoteEngine(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=5)
    server.shutdown()
    server.server_close()  # the server is gone before the first rollout

    class PushesNothing:
        """The remote engine as process > 0 sees it: it generates, process 0 pushes the weights."""

        def generate(self, prompts, params):
            return remote.generate(prompts, params)

        def update_weights(self, named):
            pass

        def close(self):
            pass

    cfg = tiny_config(base_model, tmp_path)
    trainer = ADRPOTrainer(cfg, reward_fn=TargetTokenReward(tokenizer), rows=tiny_rl_rows(), engine=PushesNothing())
    try:
        with pytest.raises(RuntimeError, match="step 1: the rollout engine failed .*stopping"):
            trainer.train()
    finally:
        trainer.close()


@pytest.mark.slow
def test_resume_repeats_the_run_exactly_and_writes_no_metric_row_twice(base_model, tokenizer, tmp_path):
    extra = ("train.max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=0", "optim.lr=1e-3")
    full = _trainer(base_model, tokenizer, tmp_path / "full", *extra)
    try:
        reference = full.train().metrics
    finally:
        full.close()

    out = tmp_path / "killed"
    first = _trainer(base_model, tokenizer, out, *extra)
    try:
        first.train()
    finally:
        first.close()
    # As if killed during step 4: its checkpoint never completed, its rows 3 and 4 were written.
    shutil.rmtree(out / "checkpoints" / "step-000004")
    resumed = _trainer(base_model, tokenizer, out, *extra, "checkpoint.resume=latest")
    try:
        assert resumed.state.step == 2
        rest = resumed.train().metrics
    finally:
        resumed.close()
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for ref, got in zip(reference[2:], rest, strict=True):
        # Same sessions, same samples (seeded per step), same weights: the same rewards and loss.
        assert got["reward/mean"] == ref["reward/mean"]
        assert got["train/loss"] == pytest.approx(ref["train/loss"], abs=1e-6)
    for a, b in zip((r["reward/mean"] for r in rows), (m["reward/mean"] for m in reference), strict=True):
        assert a == b
    assert json.loads((out / "checkpoints" / "step-000004" / "trainer_state.json").read_text())["step"] == 4


# ---------------------------------------------------------------------------------------------
# It learns
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_reward_and_validity_rise_on_a_small_task(base_model, tokenizer, tmp_path):
    trainer = _trainer(
        base_model, tokenizer, tmp_path,
        "train.max_steps=20", "optim.lr=3e-3", "loss.beta=0", "rollout.group_size=8", "rollout.max_tokens=12",
        "checkpoint.every_steps=0",
    )  # fmt: skip
    try:
        result = trainer.train()
    finally:
        trainer.close()
    rewards = [m["reward/mean"] for m in result.metrics]
    valid = [m["reward/valid_rate"] for m in result.metrics]
    # A fresh model: ~3% target tokens, so reward ~0.04 and about 4 in 10 outputs valid.
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert first < 0.1 and last > first + 0.3, rewards
    assert sum(valid[-4:]) / 4 > sum(valid[:4]) / 4 + 0.3, valid
    assert result.plot is not None and result.plot.stat().st_size > 1000


@pytest.mark.slow
def test_script_end_to_end_on_the_world_with_the_in_process_reward(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "run"
    cmd = [
        sys.executable, str(repo / "trainers" / "adrpo.py"),
        "model.path=null", f"checkpoint.output_dir={out}", "data.world_conversations=2", "data.world_sessions=1",
        "data.sessions_per_step=1", "rollout.group_size=2", "rollout.max_tokens=8", "train.max_steps=1",
        "rollout.engine=transformers",  # the embedded default's vLLM takes ~20 s to start
        "logging.progress_bar=false",
    ]  # fmt: skip
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # It says where everything went, and everything is there.
    assert f"metrics: {out / 'metrics.jsonl'}" in proc.stdout
    assert f"reward curve: {out / 'reward_curve.png'}" in proc.stdout
    assert f"checkpoint: {out / 'checkpoints' / 'step-000001'}" in proc.stdout
    (row,) = read_metrics(out)
    # The world data was prepared, every sample was scored by the real reward (a fresh tiny model
    # writes no valid operation, so all rewards are 0 and every group has zero variance).
    assert row["batch/samples"] == 4 * 2 and row["batch/masked_reward_failed"] == 0
    assert row["reward/valid_rate"] == 0.0 and row["batch/zero_variance_groups"] == 4
    assert (out / "reward_curve.png").stat().st_size > 1000
    assert (out / "checkpoints" / "step-000001" / "model" / "config.json").is_file()
