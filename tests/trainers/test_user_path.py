"""The path a user takes, through the entry scripts' `main()`s: prepare the world data with the
policy's tokenizer -> SFT on the prepared pairs -> ADRPO from the SFT checkpoint on the prepared
RL set. Each stage must leave outputs the next one (and a user) can load."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainers import adrpo, prepare_data, sft
from trainers.data.rl_rows import read_rl_rows
from trainers.metrics import read_metrics
from trainers.tiny import save_tiny_policy


def _weights(path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


@pytest.mark.slow
def test_prepare_then_sft_then_adrpo_from_the_sft_checkpoint(tmp_path):
    base = save_tiny_policy(tmp_path / "base", seed=0)
    data = tmp_path / "data"

    # 1. Prepare: 2 conversations x 1 session of the world, expert lengths in the tiny tokenizer.
    rc = prepare_data.main([
        "--dataset", "world", "--expert", "world", "--out", str(data), "--world-conversations", "2",
        "--world-sessions", "1", "--tokenizer", str(base), "--heldout-fraction", "0", "--no-progress",
    ])  # fmt: skip
    assert rc == 0
    pairs = [json.loads(x) for x in (data / "sft.jsonl").read_text().splitlines()]
    rl_set = read_rl_rows(data / "rl.parquet")
    # 2 sessions x 4 agents, one SFT pair and one RL row each.
    assert len(pairs) == 8 and len(rl_set.rows) == 8
    assert {r.split for r in rl_set.rows} == {"train"}
    assert all(p["messages"] and p["target"] for p in pairs)

    # 2. SFT, 2 steps of 1 pair, on the prepared file (prompts are ~2,500 tiny-tokenizer tokens).
    sft_out = tmp_path / "sft"
    sft.main([
        "--data", str(data / "sft.jsonl"), f"model.path={base}", "data.max_length=4096", "train.batch_size=1",
        "train.max_steps=2", f"checkpoint.output_dir={sft_out}", "logging.progress_bar=false",
        "logging.tensorboard=false",
    ])  # fmt: skip
    sft_model = sft_out / "checkpoints" / "step-000002" / "model"
    assert [r["step"] for r in read_metrics(sft_out)] == [1, 2]
    trained, before = _weights(sft_model), _weights(base)
    assert trained.keys() == before.keys()
    assert any(not torch.equal(trained[k], before[k]) for k in trained)  # SFT changed the policy
    assert AutoTokenizer.from_pretrained(sft_model).chat_template == AutoTokenizer.from_pretrained(base).chat_template

    # 3. ADRPO, 1 step from the SFT checkpoint, on the prepared RL set, with the real in-process
    # reward (snapshots found beside rl.parquet) and the transformers engine.
    rl_out = tmp_path / "adrpo"
    adrpo.main([
        f"model.path={sft_model}", f"data.path={data / 'rl.parquet'}", f"checkpoint.output_dir={rl_out}",
        "rollout.engine=transformers", "rollout.group_size=2", "rollout.max_tokens=8",
        "data.sessions_per_step=1", "train.max_steps=1", "train.gradient_checkpointing=false",
        "logging.progress_bar=false", "logging.tensorboard=false",
    ])  # fmt: skip
    saved = json.loads((rl_out / "trainer_config.json").read_text())
    assert saved["model"]["path"] == str(sft_model)  # policy and reference start from the SFT weights
    (row,) = read_metrics(rl_out)
    # One session x 4 agents x G = 2 samples, every one scored by the reward (none failed).
    assert row["batch/samples"] == 8 and row["batch/masked_reward_failed"] == 0
    assert 0.0 <= row["reward/valid_rate"] <= 1.0
    rl_model = rl_out / "checkpoints" / "step-000001" / "model"
    model = AutoModelForCausalLM.from_pretrained(rl_model)
    tok = AutoTokenizer.from_pretrained(rl_model)
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert (rl_out / "reward_curve.png").stat().st_size > 1000
