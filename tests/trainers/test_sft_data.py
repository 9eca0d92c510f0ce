"""SFT rendering with chat templates whose end of turn is not eos, and template options
(issue 12 item 8): the target ends at the end-of-turn token, options reach every render, and the
SFT prompt is token for token what the rollout renders for the same messages and options."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rollout.chat import render_prompt
from trainers.sft_data import (
    IGNORE_INDEX,
    SFTDataError,
    SFTPair,
    end_of_turn_token,
    render_pair,
    tokenize_pair,
    tokenize_pairs,
)
from trainers.tiny import CHATML_TEMPLATE, train_tokenizer

# Written for these tests in the shape of Qwen3's template: the last assistant turn carries a
# (here empty) think block, and `enable_thinking=false` puts that empty block into the generation
# prompt, so the model answers directly.
QWEN3_STYLE_TEMPLATE = (
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' and loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Ids of the tiny tokenizer (see tests/trainers/test_sft.py): <|endoftext|> 0, <|im_start|> 1,
# <|im_end|> 2; one-character tokens 3 + ord(c) - ord("!"): "o" -> 81, "k" -> 77.
ENDOFTEXT, IM_END, O, K = 0, 2, 81, 77


def _base_model_tokenizer(template: str = CHATML_TEMPLATE):
    """A tokenizer like a base model's: eos <|endoftext|>, turns closed by <|im_end|>."""
    tok = train_tokenizer()
    tok.eos_token = "<|endoftext|>"
    tok.chat_template = template
    assert tok.eos_token_id == ENDOFTEXT
    return tok


@pytest.fixture(scope="module")
def base_tok():
    return _base_model_tokenizer()


@pytest.fixture(scope="module")
def qwen3_tok():
    return _base_model_tokenizer(QWEN3_STYLE_TEMPLATE)


def _pair(user: str, target: str) -> SFTPair:
    return SFTPair(({"role": "user", "content": user},), target)


def test_the_target_ends_at_im_end_when_eos_is_endoftext(base_tok):
    prompt_ids, target_ids = render_pair(base_tok, _pair("hi", "ok"))
    # The template adds "ok<|im_end|>\n"; the target stops at <|im_end|> (id 2). Before the fix it
    # was "ok<|im_end|>\n<|endoftext|>": o, k, <|im_end|>, "\n", then eos 0 appended.
    assert target_ids == [O, K, IM_END]
    assert base_tok.decode(prompt_ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert end_of_turn_token(base_tok) == "<|im_end|>"


def test_end_of_turn_is_read_off_the_template():
    plain = train_tokenizer()
    plain.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    assert end_of_turn_token(plain) is None  # no special token closes a turn: eos gets appended
    # A template that closes the turn and then writes eos (as some do after the last message):
    # the end of the turn is the first special token after the reply, not the eos after it.
    closing = _base_model_tokenizer(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% else %}{{ '<|endoftext|>' }}{% endif %}"
    )
    assert end_of_turn_token(closing) == "<|im_end|>"
    assert render_pair(closing, _pair("hi", "ok"))[1] == [O, K, IM_END]
    # A template that trims the reply (as Llama 3's does) still finds its end.
    trimming = _base_model_tokenizer(CHATML_TEMPLATE.replace("message['content']", "message['content'] | trim"))
    assert render_pair(trimming, _pair("hi", " ok \n"))[1] == [O, K, IM_END]


def test_enable_thinking_false_reaches_the_template(qwen3_tok):
    pair = _pair("hi", "ok")
    prompt_ids, target_ids = render_pair(qwen3_tok, pair, {"enable_thinking": False})
    # The empty think block is part of the prompt: the model learns to answer right after it.
    assert qwen3_tok.decode(prompt_ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert target_ids == [O, K, IM_END]
    # Without the option the generation prompt stops at "assistant\n" and the target is what the
    # template writes for the turn: the empty think block, the reply, <|im_end|>.
    prompt_ids, target_ids = render_pair(qwen3_tok, pair)
    assert qwen3_tok.decode(prompt_ids).endswith("<|im_start|>assistant\n")
    assert qwen3_tok.decode(target_ids) == "<think>\n\n</think>\n\nok<|im_end|>"
    assert target_ids[-1] == IM_END and ENDOFTEXT not in target_ids


@pytest.mark.parametrize("kwargs", [None, {"enable_thinking": False}, {"enable_thinking": True}])
def test_the_sft_prompt_is_the_rollout_prompt(qwen3_tok, kwargs):
    # The policy must see during RL exactly the prompt tokens it was fine-tuned on.
    messages = [{"role": "system", "content": "You are the episodic memory agent."},
                {"role": "user", "content": "Caroline: I went to a support group yesterday."}]  # fmt: skip
    prompt_ids, _ = render_pair(qwen3_tok, SFTPair(tuple(messages), '{"operations": []}'), kwargs)
    assert prompt_ids == render_prompt(qwen3_tok, messages, chat_template_kwargs=kwargs)


def test_tokenize_pairs_passes_the_options_and_labels_only_the_target(qwen3_tok):
    (example,) = tokenize_pairs(qwen3_tok, [_pair("hi", "ok")], max_length=100, chat_template_kwargs={"enable_thinking": False})
    n_prompt = len(example) - 3
    assert example.labels == [IGNORE_INDEX] * n_prompt + [O, K, IM_END]
    # Truncation keeps the whole target, also with the options.
    cut, status = tokenize_pair(qwen3_tok, _pair("hi", "ok"), 10, "truncate", {"enable_thinking": False})
    assert status == "prompt_cut" and cut.input_ids == example.input_ids[-10:]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40))
def test_any_reply_is_the_target_then_exactly_one_end_of_turn(base_tok, target):
    _, target_ids = render_pair(base_tok, _pair("hi", target))
    assert target_ids[-1] == IM_END and ENDOFTEXT not in target_ids
    if "<|" not in target:  # a reply holding special-token text is tokenized as that token
        assert base_tok.decode(target_ids) == target + "<|im_end|>"
        assert target_ids.count(IM_END) == 1


def test_the_end_of_turn_is_cached_per_template_and_options(qwen3_tok):
    tok = _base_model_tokenizer(QWEN3_STYLE_TEMPLATE)
    assert end_of_turn_token(tok, {"enable_thinking": False}) == "<|im_end|>"
    # Changing the template changes the answer: the cache is keyed by it.
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    assert end_of_turn_token(tok, {"enable_thinking": False}) is None
    assert render_pair(tok, _pair("hi", "ok"))[1][-1] == ENDOFTEXT  # eos appended


def test_a_tokenizer_without_a_template_is_refused():
    tok = train_tokenizer()
    tok.chat_template = None
    with pytest.raises(SFTDataError, match="no chat template"):
        render_pair(tok, _pair("hi", "ok"))


def test_the_sft_trainer_renders_with_the_configured_options(tmp_path):
    from trainers.config import SFTConfig, load_config
    from trainers.sft import SFTTrainer
    from trainers.tiny import save_tiny_policy

    model = save_tiny_policy(tmp_path / "base")
    _base_model_tokenizer(QWEN3_STYLE_TEMPLATE).save_pretrained(model)
    cfg = load_config(
        SFTConfig,
        overrides=[f"model.path={model}", f"checkpoint.output_dir={tmp_path / 'run'}", "train.max_steps=1",
                   "data.chat_template_kwargs.enable_thinking=false", "logging.progress_bar=false",
                   "logging.tensorboard=false"],
    )  # fmt: skip
    trainer = SFTTrainer(cfg, [_pair("hi", "ok")])
    try:
        (example,) = trainer.examples
        assert [t for t in example.labels if t != IGNORE_INDEX] == [O, K, IM_END]
        assert trainer.tokenizer.decode(example.input_ids).endswith("<think>\n\n</think>\n\nok<|im_end|>")
        # Generation stops at the end of the turn too, not only at the tokenizer's eos: the
        # checkpoint's generation config carries both (what engines and vLLM read).
        checkpoint = trainer.train().checkpoint
    finally:
        trainer.close()
    saved = json.loads((checkpoint / "model" / "generation_config.json").read_text())
    assert sorted(saved["eos_token_id"]) == [ENDOFTEXT, IM_END]
