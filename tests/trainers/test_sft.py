"""SFT: data rendering and label masks, batching, the loss, learning, and the entry script."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainers.config import SFTConfig, load_config
from trainers.metrics import read_metrics
from trainers.sft import SFTTrainer, target_nll_sum
from trainers.sft_data import (
    IGNORE_INDEX,
    SFTDataError,
    SFTPair,
    collate,
    epoch_batches,
    micro_batches,
    read_pairs,
    render_pair,
    tokenize_pair,
    tokenize_pairs,
)
from trainers.tiny import train_tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


def _pair(user: str, target: str) -> SFTPair:
    return SFTPair(({"role": "user", "content": user},), target)


# ---------------------------------------------------------------------------------------------
# Rendering and labels
# ---------------------------------------------------------------------------------------------


def test_labels_cover_exactly_the_assistant_reply_and_its_end_token(tokenizer):
    example, status = tokenize_pair(tokenizer, _pair("hi", "ok"), max_length=100)
    assert status == "ok"
    # ChatML: the prompt is "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" (18 tokens
    # with this tokenizer); the target is "ok<|im_end|>". The template's newline after the final
    # <|im_end|> is not trained on: generation stops at eos.
    prompt_text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(example.input_ids[:18]) == prompt_text
    # Single characters are byte-level tokens with id 3 + ord(c) - ord("!") (3 special tokens,
    # then the alphabet from "!"): "o" -> 3 + 111 - 33 = 81, "k" -> 3 + 107 - 33 = 77;
    # <|im_end|> is id 2 and is the eos token.
    assert tokenizer.eos_token_id == 2
    assert example.input_ids[18:] == [81, 77, 2]
    assert example.labels == [IGNORE_INDEX] * 18 + [81, 77, 2]


def test_eos_is_appended_when_the_template_does_not_end_the_turn():
    plain = train_tokenizer()
    plain.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    prompt_ids, target_ids = render_pair(plain, _pair("hi", "ok"))
    assert plain.decode(prompt_ids) == "user: hi\nassistant: "
    # "ok\n" from the template, then eos added: o, k, newline ("Ċ" = byte 10), <|im_end|>.
    assert plain.convert_ids_to_tokens(target_ids) == ["o", "k", "Ċ", "<|im_end|>"]


def test_a_template_that_changes_the_prompt_cannot_be_split():
    odd = train_tokenizer()
    # The generation prompt opens a think block that the rendered assistant turn does not have.
    odd.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: <think>' }}{% endif %}"
    )
    with pytest.raises(SFTDataError, match="cannot be separated"):
        render_pair(odd, _pair("hi", "ok"))


def test_truncation_cuts_the_prompt_from_the_left_or_drops(tokenizer):
    pair = _pair("hi", "ok")  # 18 prompt + 3 target tokens = 21
    cut, status = tokenize_pair(tokenizer, pair, max_length=10)
    assert status == "prompt_cut"
    full, _ = tokenize_pair(tokenizer, pair, max_length=100)
    # The last 7 prompt tokens survive, the 3 target tokens stay whole.
    assert cut.input_ids == full.input_ids[-10:]
    assert cut.labels == [IGNORE_INDEX] * 7 + [81, 77, 2]
    assert tokenize_pair(tokenizer, pair, max_length=10, truncation="drop") == (None, "dropped")
    # A target that does not fit with at least one prompt token is dropped either way.
    assert tokenize_pair(tokenizer, pair, max_length=3) == (None, "dropped")
    # "ok" * 20 is 40 one-character tokens plus eos: longer than max_length on its own.
    long_target = _pair("hi", "ok" * 20)
    message = r"2 of 2 examples exceed .* 1 had their prompt cut from the left, 1 were dropped"
    with pytest.warns(UserWarning, match=message):
        kept = tokenize_pairs(tokenizer, [pair, long_target], max_length=10)
    assert kept == [cut]


def test_rows_of_both_formats_and_errors_naming_line_and_field(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "target": "t"},
        {"prompt": "just text", "completion": "c"},
        {"prompt": [{"role": "user", "content": "u2"}], "completion": "c2"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    pairs = read_pairs(path)
    assert pairs[0] == SFTPair(({"role": "system", "content": "s"}, {"role": "user", "content": "u"}), "t")
    assert pairs[1] == _pair("just text", "c") and pairs[2] == _pair("u2", "c2")

    bad_rows = {
        '{"messages": [{"role": "user", "content": "u"}]}': "pairs.jsonl line 2: field 'target' must be a string",
        '{"messages": [{"role": "user"}], "target": "t"}': "pairs.jsonl line 2: field 'messages'[0]: must be",
        '{"prompt": "p", "completion": 3}': "pairs.jsonl line 2: field 'completion' must be a string, got 3",
        '{"question": "q"}': "pairs.jsonl line 2: needs 'messages' and 'target', or 'prompt' and 'completion'",
        '{"prompt": "p", ': "pairs.jsonl line 2: not valid JSON",
        "[1, 2]": "pairs.jsonl line 2: expected a JSON object, got list",
    }
    for line, message in bad_rows.items():
        path.write_text(json.dumps(rows[0]) + "\n" + line + "\n")
        with pytest.raises(SFTDataError) as info:
            read_pairs(path)
        assert message in str(info.value)


# ---------------------------------------------------------------------------------------------
# Batching and loss
# ---------------------------------------------------------------------------------------------


def test_length_grouped_batches_are_deterministic_and_cover_every_example():
    lengths = [1, 9, 2, 8, 5, 5, 3, 7]
    batches = epoch_batches(lengths, batch_size=2, seed=0, epoch=0)
    assert batches == epoch_batches(lengths, batch_size=2, seed=0, epoch=0)
    assert batches != epoch_batches(lengths, batch_size=2, seed=0, epoch=1)
    assert sorted(i for b in batches for i in b) == list(range(8))
    # Within a chunk the examples are sorted by length, so the pairs are (9,8), (7,5), (5,3),
    # (2,1): 4 batches whose padding totals 1 + 2 + 2 + 1 = 6 tokens.
    assert sorted(sorted(lengths[i] for i in b) for b in batches) == [[1, 2], [3, 5], [5, 7], [8, 9]]
    # 5 examples in batches of 4: padded with the first indices of the shuffled order.
    padded = epoch_batches([1, 2, 3, 4, 5], batch_size=4, seed=0, epoch=0, group_by_length=False)
    flat = [i for b in padded for i in b]
    assert len(flat) == 8 and sorted(set(flat)) == [0, 1, 2, 3, 4] and flat[5:] == flat[:3]


def test_micro_batches_split_a_global_batch_by_step_then_process():
    batch = list(range(8))  # 2 processes x 2 accumulation steps x 2 examples
    assert micro_batches(batch, num_processes=2, process_index=0, grad_accum_steps=2) == [[0, 1], [4, 5]]
    assert micro_batches(batch, num_processes=2, process_index=1, grad_accum_steps=2) == [[2, 3], [6, 7]]
    with pytest.raises(ValueError, match="does not split"):
        micro_batches(list(range(6)), num_processes=2, process_index=0, grad_accum_steps=2)


def test_collate_pads_right_and_masks_padding(tokenizer):
    a, _ = tokenize_pair(tokenizer, _pair("hi", "ok"), 100)
    b, _ = tokenize_pair(tokenizer, _pair("hi there", "ok"), 100)
    batch = collate([a, b], pad_token_id=0)
    width = max(len(a), len(b))
    assert batch["input_ids"].shape == (2, width)
    short = 0 if len(a) < len(b) else 1
    n = min(len(a), len(b))
    assert batch["attention_mask"][short].tolist() == [1] * n + [0] * (width - n)
    assert batch["labels"][short, n:].tolist() == [IGNORE_INDEX] * (width - n)
    assert batch["input_ids"][short, n:].tolist() == [0] * (width - n)


def test_target_nll_sum_by_hand():
    # Two sequences of 3 positions over a vocabulary of 2. Uniform logits give -log(1/2) = ln 2
    # per scored token; the label at t is scored by the logits at t - 1.
    logits = torch.zeros(2, 3, 2)
    labels = torch.tensor([[IGNORE_INDEX, 1, 0], [IGNORE_INDEX, IGNORE_INDEX, 1]])
    assert target_nll_sum(logits, labels).item() == pytest.approx(3 * math.log(2))
    # Logits (0, ln 3) at position 0 of row 0: p(token 1) = 3/4, so that term becomes -ln(3/4).
    logits[0, 0, 1] = math.log(3)
    expected = -math.log(3 / 4) + 2 * math.log(2)
    assert target_nll_sum(logits, labels).item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Learning
# ---------------------------------------------------------------------------------------------

PAIRS = [
    _pair("Caroline: I went to a support group yesterday.", '{"action": "ADD", "memory": "Caroline went to a group."}'),
    _pair("Melanie: I just signed up for a pottery class.", '{"action": "ADD", "memory": "Melanie takes pottery."}'),
    _pair("Caroline: Hey Mel! How have you been?", '{"action": "SKIP", "reason": "nothing new"}'),
]


@pytest.mark.slow
def test_sft_drives_the_loss_down_and_the_model_reproduces_the_targets(tmp_path):
    cfg = load_config(
        SFTConfig,
        overrides=[
            f"checkpoint.output_dir={tmp_path}",
            "train.batch_size=3",
            "train.max_steps=40",
            "optim.lr=3e-3",
            "optim.warmup_steps=2",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
        ],
    )
    trainer = SFTTrainer(cfg, PAIRS)
    result = trainer.train()
    trainer.close()
    # A fresh model starts near ln(vocab) = ln(1024) ~ 6.9 nats per token.
    assert result.losses[0] == pytest.approx(math.log(1024), abs=0.3)
    assert result.losses[-1] < 0.5
    model, tok = trainer.unwrapped_model.eval(), trainer.tokenizer
    for pair in PAIRS:
        prompt_ids, target_ids = render_pair(tok, pair)
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt_ids]), max_new_tokens=len(target_ids) + 4, do_sample=False,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            )  # fmt: skip
        assert tok.decode(out[0, len(prompt_ids) :]) == pair.target + "<|im_end|>"


@pytest.mark.slow
def test_sft_script_end_to_end(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p.messages[0]["content"], "completion": p.target}) for p in PAIRS))
    config = tmp_path / "sft.toml"
    config.write_text("[train]\nbatch_size = 3\nmax_steps = 12\n[optim]\nlr = 3e-3\n[checkpoint]\nevery_steps = 5\n")
    out = tmp_path / "run"
    cmd = [
        sys.executable, "trainers/sft.py", "--config", str(config), "--data", str(data),
        f"checkpoint.output_dir={out}", "logging.progress_bar=false",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # The config is printed first, compactly (one line per section with non-default values), and
    # saved in full; the run ends with where its results went, the checkpoint last.
    lines = proc.stdout.splitlines()
    assert lines[0] == f"config (what differs from the SFTConfig defaults; all of it in {out / 'trainer_config.json'}):"
    assert f"  data: path={data}" in lines and "  train: batch_size=3 max_steps=12" in lines
    saved = json.loads((out / "trainer_config.json").read_text())
    assert saved["train"]["max_steps"] == 12 and saved["data"]["path"] == str(data) and saved["optim"]["lr"] == 3e-3
    assert lines[-1] == f"checkpoint: {out / 'checkpoints' / 'step-000012'} (model: {out / 'checkpoints' / 'step-000012' / 'model'})"
    assert (out / "training_curves.png").stat().st_size > 1000
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] - 1.0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # Every 5 steps and at the end; keep_last=2 removed step 5.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000010", "step-000012"]
    assert (out / "checkpoints" / "step-000012" / "model" / "model.safetensors").is_file()
    assert (out / "base_model" / "config.json").is_file()  # the tiny model it built (model.path unset)
