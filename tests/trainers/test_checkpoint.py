"""Checkpoints: HF-loadable contents, and a resume that continues exactly like an uninterrupted run."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainers.checkpoint import TrainState, latest_checkpoint, list_checkpoints, load_checkpoint, read_train_state
from trainers.config import SFTConfig, load_config
from trainers.sft import SFTTrainer

STEPS, STOP_AT = 6, 3


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    from trainers.tiny import save_tiny_policy

    return save_tiny_policy(tmp_path_factory.mktemp("base") / "model", seed=0)


def _config(base_model: Path, output_dir: Path, *extra: str) -> SFTConfig:
    # 6 built-in pairs, global batch 4 (2 examples x 2 accumulation steps): 2 batches per epoch,
    # so stopping after step 3 stops in the middle of the second epoch.
    return load_config(
        SFTConfig,
        overrides=[
            f"model.path={base_model}",
            f"checkpoint.output_dir={output_dir}",
            "train.batch_size=2",
            "train.grad_accum_steps=2",
            f"train.max_steps={STEPS}",
            "optim.lr=3e-3",
            "optim.warmup_steps=2",
            "optim.weight_decay=0.01",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
            *extra,
        ],
    )


def _snapshot(trainer: SFTTrainer) -> dict:
    model = trainer.unwrapped_model
    names = {id(p): n for n, p in model.named_parameters()}
    optim = {
        names[id(p)]: {k: v.clone() for k, v in trainer.torch_optimizer.state[p].items()}
        for group in trainer.torch_optimizer.param_groups
        for p in group["params"]
    }
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
        "optim": optim,
        "lr": trainer.scheduler.get_last_lr(),
        "rng": torch.get_rng_state(),
    }


def _run_interrupted_and_uninterrupted(base_model: Path, tmp_path: Path, *extra: str):
    full = SFTTrainer(_config(base_model, tmp_path / "full", *extra))
    full_result = full.train()
    full.close()

    first = SFTTrainer(_config(base_model, tmp_path / "split", *extra))
    first_result = first.train(stop_at=STOP_AT)
    first.close()
    assert first_result.checkpoint == tmp_path / "split" / "checkpoints" / f"step-{STOP_AT:06d}"
    # Disturb the global RNG: the resumed run must restore it from the checkpoint.
    torch.manual_seed(12345)
    cfg = _config(base_model, tmp_path / "split", *extra)
    resumed = SFTTrainer(replace(cfg, checkpoint=replace(cfg.checkpoint, resume="latest")))
    assert resumed.state.step == STOP_AT
    resumed_result = resumed.train()
    resumed.close()
    return full, full_result, first_result, resumed, resumed_result


def _assert_identical(full: SFTTrainer, resumed: SFTTrainer) -> None:
    a, b = _snapshot(full), _snapshot(resumed)
    assert a["params"].keys() == b["params"].keys() and a["params"]
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), name
    assert a["optim"].keys() == b["optim"].keys()
    for name, state in a["optim"].items():
        assert state.keys() == b["optim"][name].keys() == {"step", "exp_avg", "exp_avg_sq"}
        for key in state:
            assert torch.equal(state[key], b["optim"][name][key]), (name, key)
    assert a["lr"] == b["lr"]
    assert torch.equal(a["rng"], b["rng"])


@pytest.mark.slow
def test_resume_continues_exactly_like_an_uninterrupted_run(base_model, tmp_path):
    full, full_result, first_result, resumed, resumed_result = _run_interrupted_and_uninterrupted(base_model, tmp_path)
    # Bit-identical: same data positions, same weights and optimizer moments, same schedule.
    assert first_result.losses + resumed_result.losses == full_result.losses
    _assert_identical(full, resumed)
    assert resumed.state == full.state == TrainState(
        step=6, epoch=2, batch_in_epoch=2, global_batch_size=4, examples_seen=24,
        target_tokens_seen=full.state.target_tokens_seen,
    )  # fmt: skip
    # 24 examples = 4 passes over the 6 pairs (padding repeats 2 per epoch); each pair's target
    # has more than 20 tokens.
    assert full.state.target_tokens_seen > 24 * 20


@pytest.mark.slow
def test_lora_resume_is_exact_and_the_merged_model_matches(base_model, tmp_path):
    lora = ("lora.enabled=true", "lora.r=4", "lora.alpha=8", "lora.save_merged=true")
    full, full_result, first_result, resumed, resumed_result = _run_interrupted_and_uninterrupted(
        base_model, tmp_path, *lora
    )
    assert first_result.losses + resumed_result.losses == full_result.losses
    _assert_identical(full, resumed)
    # Only the adapter trains: 7 target modules x 2 layers x (A, B).
    assert len(_snapshot(full)["params"]) == 28

    ckpt = resumed_result.checkpoint
    assert (ckpt / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(ckpt / "model", dtype=torch.float32).eval()
    ids = torch.tensor([[1, 87, 85, 265, 201, 74, 75, 2]])
    with torch.no_grad():
        expected = resumed.unwrapped_model.eval()(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_checkpoint_contents_load_back(base_model, tmp_path):
    cfg = _config(base_model, tmp_path, "train.max_steps=2", "checkpoint.every_steps=1", "checkpoint.keep_last=0")
    trainer = SFTTrainer(cfg)
    result = trainer.train()
    trainer.close()
    ckpts = list_checkpoints(tmp_path / "checkpoints")
    assert [c.name for c in ckpts] == ["step-000001", "step-000002"]
    assert latest_checkpoint(tmp_path / "checkpoints") == ckpts[-1]
    ckpt = result.checkpoint
    assert read_train_state(ckpt) == trainer.state
    assert load_config(SFTConfig, ckpt / "trainer_config.json") == cfg
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank-00000.pt"]
    # Model and optimizer state in torch.distributed.checkpoint form (one process: one file).
    assert sorted(p.name for p in (ckpt / "dcp").iterdir()) == [".metadata", "__0_0.distcp"]
    assert not (ckpt / "optimizer.pt").exists()

    model = AutoModelForCausalLM.from_pretrained(ckpt / "model", dtype=torch.float32)
    trained = trainer.unwrapped_model.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name]), name
    tok = AutoTokenizer.from_pretrained(ckpt / "model")
    assert tok("Caroline")["input_ids"] == trainer.tokenizer("Caroline")["input_ids"]
    assert tok.chat_template == trainer.tokenizer.chat_template


def test_latest_checkpoint_skips_incomplete_ones(tmp_path):
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(root) is None
    for name in ("step-000002", "step-000010"):
        (root / name).mkdir(parents=True)
        (root / name / "trainer_state.json").write_text(json.dumps({"step": int(name[5:])}))
    (root / "step-000011.tmp").mkdir()  # being written
    (root / "step-000012").mkdir()  # no trainer_state.json: not complete
    (root / "notes").mkdir()
    assert latest_checkpoint(root) == root / "step-000010"
    assert [p.name for p in list_checkpoints(root)] == ["step-000002", "step-000010"]


def test_resume_refuses_a_different_global_batch(base_model, tmp_path):
    trainer = SFTTrainer(_config(base_model, tmp_path, "train.max_steps=1"))
    trainer.train()
    trainer.close()
    cfg = _config(base_model, tmp_path, "train.max_steps=2", "train.grad_accum_steps=1", "checkpoint.resume=latest")
    with pytest.raises(ValueError, match="global batch of 4 examples, this run has 2"):
        SFTTrainer(cfg)


def _to_previous_format(trainer: SFTTrainer, checkpoint: Path) -> None:
    """Rewrite `checkpoint` as the previous format wrote it: the full optimizer state in optimizer.pt."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(
        trainer.unwrapped_model, trainer.torch_optimizer, options=StateDictOptions(full_state_dict=True)
    )
    torch.save(full, checkpoint / "optimizer.pt")
    shutil.rmtree(checkpoint / "dcp")


@pytest.mark.slow
def test_a_checkpoint_of_the_previous_format_still_resumes_exactly(base_model, tmp_path):
    full = SFTTrainer(_config(base_model, tmp_path / "full"))
    full_result = full.train()
    full.close()
    first = SFTTrainer(_config(base_model, tmp_path / "split"))
    first_result = first.train(stop_at=STOP_AT)
    first.close()
    _to_previous_format(first, first_result.checkpoint)
    torch.manual_seed(12345)
    cfg = _config(base_model, tmp_path / "split", "checkpoint.resume=latest")
    resumed = SFTTrainer(cfg)
    resumed_result = resumed.train()
    resumed.close()
    assert first_result.losses + resumed_result.losses == full_result.losses
    _assert_identical(full, resumed)


def test_a_checkpoint_without_state_is_refused_naming_both_formats(base_model, tmp_path):
    trainer = SFTTrainer(_config(base_model, tmp_path, "train.max_steps=1"))
    ckpt = trainer.train().checkpoint
    trainer.close()
    shutil.rmtree(ckpt / "dcp")
    with pytest.raises(FileNotFoundError, match=r"dcp/ with \.metadata .*optimizer\.pt \(the previous format\)"):
        load_checkpoint(
            ckpt, model=trainer.unwrapped_model, optimizer=trainer.torch_optimizer, scheduler=trainer.scheduler
        )
