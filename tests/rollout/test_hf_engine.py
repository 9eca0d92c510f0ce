"""transformers backend against independent forward passes (rollout.hf_engine)."""

from __future__ import annotations

import pytest
import torch

from rollout.chat import render_prompt
from rollout.hf_engine import HFEngine
from rollout.types import InvalidRequestError, SamplingParams, WeightSyncError
from tests.rollout.conftest import PROMPTS, forward_logprobs, greedy_reference, load_model, load_tokenizer


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return HFEngine(tiny_dir, max_batch_size=5)


def test_sampled_logprobs_match_a_forward_pass(engine, original):
    # 4 prompts of different lengths x n=3 = 12 rows in micro-batches of 5: left padding everywhere.
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_tokens=8, seed=3)
    out = engine.generate(PROMPTS, params)
    assert [len(samples) for samples in out] == [3, 3, 3, 3]
    for prompt, samples in zip(PROMPTS, out, strict=True):
        ids = render_prompt(engine.tokenizer, prompt)
        for c in samples:
            assert c.prompt_token_ids == tuple(ids)
            assert len(c.token_ids) == len(c.logprobs) > 0
            ref = forward_logprobs(original, ids, c.token_ids)
            torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-5, rtol=0)
    assert len({c.token_ids for c in out[0]}) > 1  # the n samples of one prompt are drawn independently


def test_greedy_matches_an_argmax_loop(engine, original):
    out = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10))
    for prompt, (c,) in zip(PROMPTS, out, strict=True):
        tokens, lps = greedy_reference(original, render_prompt(engine.tokenizer, prompt), 10, engine.eos_ids)
        assert list(c.token_ids) == tokens
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(lps), atol=1e-5, rtol=0)


def test_seed_makes_sampling_reproducible(engine):
    params = SamplingParams(n=2, max_tokens=8, seed=11)
    a, b = engine.generate(PROMPTS[:2], params), engine.generate(PROMPTS[:2], params)
    other = engine.generate(PROMPTS[:2], SamplingParams(n=2, max_tokens=8, seed=12))
    assert [[c.token_ids for c in s] for s in a] == [[c.token_ids for c in s] for s in b]
    assert [[c.token_ids for c in s] for s in a] != [[c.token_ids for c in s] for s in other]


def test_stop_string_cuts_the_same_sample(engine):
    params = SamplingParams(max_tokens=20, seed=5)
    (full,) = engine.generate(PROMPTS[:1], params)[0]
    tok = engine.tokenizer
    text = tok.decode(list(full.token_ids), skip_special_tokens=True)
    assert len(text) >= 8 and full.finish_reason == "length"
    stop = text[len(text) // 2 - 3 : len(text) // 2]  # three characters from the middle of the text
    k = next(k for k in range(1, 21) if stop in tok.decode(list(full.token_ids[:k]), skip_special_tokens=True))
    (cut,) = engine.generate(PROMPTS[:1], SamplingParams(max_tokens=20, seed=5, stop=(stop,)))[0]
    assert cut.token_ids == full.token_ids[:k] and cut.logprobs == pytest.approx(full.logprobs[:k], abs=1e-6)
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert cut.text == tok.decode(list(full.token_ids[:k]), skip_special_tokens=True).split(stop)[0]


def test_eos_ends_a_completion_unless_ignored(tiny_dir, original):
    tok = load_tokenizer(tiny_dir)
    prompt = [5, 17, 300, 42]
    (first,), _ = greedy_reference(original, prompt, 1)
    # Declare the greedy first token to be EOS: the completion is that one token, finished by it.
    eos_tok = load_tokenizer(tiny_dir)
    eos_tok.eos_token = tok.convert_ids_to_tokens(first)
    engine = HFEngine(load_model(tiny_dir), eos_tok)
    (c,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=6))[0]
    assert c.token_ids == (first,) and c.finish_reason == "stop"
    (d,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert len(d.token_ids) == 6 and d.token_ids[0] == first and d.finish_reason == "length"


def test_too_long_prompt_is_refused(engine):
    with pytest.raises(InvalidRequestError, match="exceeds the model's context of 4096"):
        engine.generate([[5] * 4090], SamplingParams(max_tokens=7))


def test_weight_update_is_exact(tiny_dir, trained):
    engine = HFEngine(tiny_dir)
    trainer = trained
    prompt = render_prompt(engine.tokenizer, PROMPTS[0])
    want_tokens, want_lps = greedy_reference(trainer, prompt, 12, engine.eos_ids)
    (before,) = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=12))[0]
    # Before the push the engine still scores its tokens with the old weights.
    assert (forward_logprobs(trainer, prompt, before.token_ids) - torch.tensor(before.logprobs)).abs().max() > 1e-3
    engine.update_weights(trainer.named_parameters())
    (after,) = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=12))[0]
    assert list(after.token_ids) == want_tokens
    torch.testing.assert_close(torch.tensor(after.logprobs), torch.tensor(want_lps), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda named: named[:-1], "missing from the push"),
        (lambda named: named + [("model.layers.7.mlp.up_proj.weight", named[0][1])], "unknown weight name"),
        (lambda named: [(n, t[:-1] if "norm" in n else t) for n, t in named], "has shape"),
    ],
)
def test_bad_weight_update_leaves_the_engine_unchanged(engine, trained, corrupt, match):
    before = {n: p.clone() for n, p in engine.model.named_parameters()}
    with pytest.raises(WeightSyncError, match=match):
        engine.update_weights(corrupt(list(trained.named_parameters())))
    assert all(torch.equal(before[n], p) for n, p in engine.model.named_parameters())


def test_completions_carry_the_weight_version(tiny_dir, trained):
    engine = HFEngine(tiny_dir)
    params = SamplingParams(temperature=0, max_tokens=3)
    assert [c.weight_version for c in engine.generate(PROMPTS[:1], params)[0]] == [0]  # the loaded checkpoint
    engine.update_weights(trained.named_parameters())
    assert engine.generate(PROMPTS[:1], params)[0][0].weight_version == 1  # each push without a version: + 1
    engine.update_weights(trained.named_parameters(), version=17)
    assert engine.generate(PROMPTS[:1], params)[0][0].weight_version == 17
    with pytest.raises(WeightSyncError):
        engine.update_weights(list(trained.named_parameters())[:-1], version=18)
    assert engine.weight_version == 17  # a refused push changes nothing, the version included


def test_per_prompt_params_give_what_separate_calls_give(engine):
    short, long = SamplingParams(temperature=0, max_tokens=2), SamplingParams(temperature=0, max_tokens=7)
    mixed = engine.generate(PROMPTS[:3], [short, long, short])
    alone = [engine.generate([p], q)[0] for p, q in zip(PROMPTS[:3], [short, long, short], strict=True)]
    assert [[c.token_ids for c in s] for s in mixed] == [[c.token_ids for c in s] for s in alone]
    assert [len(s[0].token_ids) for s in mixed] == [2, 7, 2]  # tiny random weights: no early EOS here


def test_cancel_stops_the_call_in_progress_and_the_engine_stays_usable(tiny_dir):
    from rollout.types import GenerationCancelled

    engine = HFEngine(tiny_dir)
    forward = engine.model.forward
    calls = []

    def forward_then_cancel(*args, **kwargs):  # as if another thread called cancel() mid-call
        calls.append(1)
        if len(calls) == 3:
            engine.cancel()
        return forward(*args, **kwargs)

    engine.model.forward = forward_then_cancel
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    with pytest.raises(GenerationCancelled):
        engine.generate(PROMPTS[:2], params)
    assert len(calls) < 50  # it stopped early, not after the 50 steps
    engine.model.forward = forward
    engine.cancel()  # no call in progress: nothing to cancel, the next call runs whole
    (c,) = engine.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert len(c.token_ids) == 5


def test_sleep_refuses_generation_until_wake_up(engine):
    params = SamplingParams(temperature=0, max_tokens=4)
    before = engine.generate(PROMPTS[:1], params)
    engine.sleep(level=1)
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(PROMPTS[:1], params)
    engine.wake_up()
    assert [c.token_ids for c in engine.generate(PROMPTS[:1], params)[0]] == [c.token_ids for c in before[0]]
    with pytest.raises(ValueError, match="sleep level"):
        engine.sleep(level=3)


@torch.no_grad()
def _sample_reference(model, prompt_ids, seed: int, params: SamplingParams) -> list[int]:
    """Sampling without the engine: a full forward pass per step, logits / T, transformers'
    TopPLogitsWarper, softmax; then the first token whose cumulative probability exceeds u times
    the total, u one uniform draw per step from a generator seeded with `seed` (the documented
    draw), found by a plain loop."""
    from transformers import TopPLogitsWarper

    g = torch.Generator().manual_seed(seed)
    ids, out = list(prompt_ids), []
    for _ in range(params.max_tokens):
        logits = model(torch.tensor([ids])).logits.float()[:, -1] / params.temperature
        if params.top_p < 1:
            logits = TopPLogitsWarper(params.top_p)(torch.tensor([ids]), logits)
        probs = torch.softmax(logits, dim=-1)[0]
        x = float(torch.rand(1, generator=g)) * float(probs.sum())
        cum, tok = 0.0, None
        for j, pj in enumerate(probs.double().tolist()):
            cum += pj
            if cum > x and pj > 0:
                tok = j
                break
        tok = len(probs) - 1 if tok is None else tok
        out.append(tok)
        ids.append(tok)
    return out


def test_seeded_samples_follow_the_documented_seeds_alone_or_batched(tiny_dir, original):
    from rollout.types import prompt_seeds

    params = SamplingParams(n=2, temperature=0.8, top_p=0.9, max_tokens=6, seed=21, ignore_eos=True)
    small = HFEngine(tiny_dir, max_batch_size=3)
    batched = small.generate(PROMPTS, params)  # 8 rows in micro-batches of 3, left padding
    alone = HFEngine(tiny_dir).generate([PROMPTS[2]], params)[0]
    reordered = small.generate([PROMPTS[2], PROMPTS[0]], params)[0]
    tokens = lambda samples: [c.token_ids for c in samples]  # noqa: E731
    # A prompt's samples are the same alone, first in another call, or third among four.
    assert tokens(alone) == tokens(reordered) == tokens(batched[2])
    # Independent reference: sample j of a prompt uses the derived seed + j (rollout.types).
    ids = render_prompt(small.tokenizer, PROMPTS[2])
    (seed,) = prompt_seeds([params], [ids])
    assert [list(t) for t in tokens(alone)] == [_sample_reference(original, ids, seed + j, params) for j in (0, 1)]
    # Two identical prompts in one call still get different samples (occurrence 0 and 1).
    twice = small.generate([PROMPTS[2], PROMPTS[2]], params)
    assert tokens(twice[0]) == tokens(alone) and tokens(twice[1]) != tokens(twice[0])
