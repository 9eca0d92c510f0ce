"""SamplingParams validation, per-prompt seeds and the pre-tokenization length check."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerBase

from rollout.chat import check_text_length, max_token_chars, render_prompt
from rollout.types import MAX_SEED, InvalidRequestError, SamplingParams, per_prompt_params, prompt_seeds
from tests.rollout.conftest import load_tokenizer


@pytest.mark.parametrize("seed", [2**63, 2**64, -1, -(2**63)])
def test_seed_outside_int64_range_is_refused(seed):
    # 2**63 overflows vLLM's int64 seed ("Overflow when unpacking long long" inside its scheduler
    # step, which wedged the engine); -1 means "no seed" to vLLM: both refused up front.
    with pytest.raises(InvalidRequestError, match=r"seed must lie in \[0, 2\*\*63 - 1\]"):
        SamplingParams(seed=seed)


def test_largest_seed_is_accepted():
    assert SamplingParams(seed=MAX_SEED).seed == 2**63 - 1


@pytest.mark.parametrize("field, value", [("ignore_eos", "false"), ("ignore_eos", 0), ("temperature", True)])
def test_non_boolean_flags_and_boolean_numbers_are_refused(field, value):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**{field: value})


def test_per_prompt_params_checks_the_count():
    a, b = SamplingParams(n=2), SamplingParams(n=3)
    assert per_prompt_params(a, 3) == [a, a, a]
    assert per_prompt_params([a, b], 2) == [a, b]
    with pytest.raises(InvalidRequestError, match="one SamplingParams per prompt: 1 for 2"):
        per_prompt_params([a], 2)


def test_identical_prompts_get_different_seeds_and_seeds_do_not_depend_on_batch_mates():
    p = SamplingParams(seed=7)
    seeds = prompt_seeds([p, p, p], [[1, 2], [1, 2], [3]])
    assert seeds[0] != seeds[1]  # the second copy of [1, 2] gets its own randomness
    # [3] alone, or after two other prompts: the same seed (vLLM then gives it the same samples).
    assert prompt_seeds([p], [[3]]) == [seeds[2]]
    assert prompt_seeds([SamplingParams()], [[3]]) == [None]
    assert prompt_seeds([SamplingParams(seed=8)], [[3]]) != [seeds[2]]


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, MAX_SEED),
    n=st.integers(1, 4096),
    prompts=st.lists(st.lists(st.integers(0, 2**31), min_size=1, max_size=5), min_size=1, max_size=6),
)
def test_derived_seeds_leave_room_for_every_sample(seed, n, prompts):
    # vLLM seeds sample j of a prompt with (prompt seed + j): the last one, + n - 1, must stay in range.
    params = [SamplingParams(n=n, seed=seed)] * len(prompts)
    for derived in prompt_seeds(params, prompts):
        assert 0 <= derived and derived + n - 1 <= MAX_SEED


def test_too_long_text_is_refused_before_it_is_tokenized(tiny_dir, monkeypatch):
    tok = load_tokenizer(tiny_dir)
    longest = max(len(t) for t in tok.get_vocab())
    assert max_token_chars(tok) == longest
    calls = []
    original = PreTrainedTokenizerBase.__call__
    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", lambda self, *a, **k: calls.append(a) or original(self, *a, **k))
    # 100 tokens of context hold at most 100 * longest characters: one more is refused untokenized.
    with pytest.raises(InvalidRequestError, match=f"{100 * longest + 1} characters"):
        render_prompt(tok, "a" * (100 * longest + 1), max_model_len=100)
    with pytest.raises(InvalidRequestError, match="characters"):
        render_prompt(tok, [{"role": "user", "content": "a" * (100 * longest + 1)}], max_model_len=100)
    assert calls == []
    check_text_length(tok, "a" * (100 * longest), 100)  # at the bound: left to the exact token check
    assert render_prompt(tok, "a b", max_model_len=100) == tok("a b")["input_ids"]
