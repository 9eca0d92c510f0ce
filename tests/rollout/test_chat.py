"""Sampling parameters, prompt rendering and where completions end (rollout.types, rollout.chat)."""

from __future__ import annotations

import pytest

from rollout.chat import check_length, eos_token_ids, finish_completion, render_prompt
from rollout.types import InvalidRequestError, SamplingParams
from trainers.tiny import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n": 0}, "n"),
        ({"n": -2}, "n"),
        ({"n": 1.5}, "n"),
        ({"n": True}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"seed": "7"}, "seed"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_sampling_params_reject_bad_values(kwargs, field):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_normalise_stop_and_greedy():
    p = SamplingParams(stop=["a", "b"], temperature=0)
    assert p.stop == ("a", "b") and p.greedy
    assert SamplingParams(stop="x").stop == ("x",)
    assert hash(SamplingParams(stop=["a"])) == hash(SamplingParams(stop=("a",)))  # usable as a batching key


def test_render_chat_uses_the_template_without_extra_special_tokens(tok):
    ids = render_prompt(tok, [{"role": "user", "content": "hi"}])
    # ChatML by hand: the template's text, tokenized as is (the tiny tokenizer adds no BOS).
    expected = tok("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert ids == expected
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_render_text_and_token_ids(tok):
    assert render_prompt(tok, "Caroline went hiking") == tok("Caroline went hiking")["input_ids"]
    assert render_prompt(tok, [5, 6, 7]) == [5, 6, 7]
    assert render_prompt(tok, (5, 6)) == [5, 6]


@pytest.mark.parametrize(
    "prompt, match",
    [
        ([], "prompt must be"),
        ("", "empty after tokenization"),
        ([5, 99999], r"token ids must lie in \[0, 1024\)"),
        ([{"role": "user"}], "message 0 needs"),
        ([{"role": "user", "content": 3}], "message 0 needs"),
        (3.5, "prompt must be"),
        ([{"role": "user", "content": "a"}, 5], "prompt must be"),
    ],
)
def test_render_rejects_bad_prompts(tok, prompt, match):
    with pytest.raises(InvalidRequestError, match=match):
        render_prompt(tok, prompt, vocab_size=1024)


def test_check_length_names_the_sizes():
    check_length([1] * 10, 6, 16)  # 10 + 6 = 16 fits exactly
    with pytest.raises(
        InvalidRequestError, match="10 tokens; with max_tokens=7 that exceeds the model's context of 16"
    ):
        check_length([1] * 10, 7, 16)


def test_eos_ids_merge_tokenizer_and_generation_config(tok):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert eos_token_ids(tok) == {im_end}
    assert eos_token_ids(tok, [7, im_end]) == {7, im_end}
    assert eos_token_ids(tok, 9) == {9, im_end}


def _lp(n):
    return [-(i + 1) / 10 for i in range(n)]


def test_completion_ends_at_eos_and_keeps_it(tok):
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    head, tail = tok("Melanie paints")["input_ids"], tok(" landscapes")["input_ids"]
    ids = head + [eos] + tail
    c = finish_completion(tok, [1, 2], ids, _lp(len(ids)), SamplingParams(max_tokens=50), frozenset({eos}))
    assert c.token_ids == tuple(head + [eos])
    assert c.logprobs == tuple(_lp(len(ids))[: len(head) + 1])
    assert (c.text, c.finish_reason, c.prompt_token_ids) == ("Melanie paints", "stop", (1, 2))
    ignoring = finish_completion(
        tok, [1], ids, _lp(len(ids)), SamplingParams(max_tokens=len(ids), ignore_eos=True), frozenset({eos})
    )
    assert ignoring.token_ids == tuple(ids) and ignoring.finish_reason == "length"
    assert ignoring.text == "Melanie paints landscapes"  # the special EOS token is not in the text


def test_completion_ends_at_the_token_completing_a_stop_string(tok):
    ids = tok("Caroline went hiking. Then Melanie painted.")["input_ids"]
    params = SamplingParams(max_tokens=100, stop=(". Then", "painted"))
    c = finish_completion(tok, [1], ids, _lp(len(ids)), params, frozenset({0}))
    # Independent reference: the shortest token prefix whose text holds a stop string.
    k = next(k for k in range(1, len(ids) + 1) if ". Then" in tok.decode(ids[:k]) or "painted" in tok.decode(ids[:k]))
    assert c.token_ids == tuple(ids[:k]) and len(c.logprobs) == k
    assert c.text == "Caroline went hiking"  # cut before the earliest stop string
    assert c.finish_reason == "stop"


def test_completion_without_eos_or_stop_is_cut_at_max_tokens(tok):
    ids = tok("one two three four five")["input_ids"]
    c = finish_completion(tok, [1], ids, _lp(len(ids)), SamplingParams(max_tokens=3), frozenset({0}))
    assert c.token_ids == tuple(ids[:3]) and c.finish_reason == "length"
    assert c.text == tok.decode(ids[:3])
