"""A compiled (torch.compile) vLLM engine takes weight pushes too.

vLLM compiles the model once at start-up; a push re-packs every linear weight on CPU. The
compiled graph must call the new packed weights, not ones it captured when it was traced.
"""

from __future__ import annotations

import os

import pytest
import torch

from rollout.chat import render_prompt
from rollout.types import SamplingParams
from tests.rollout.conftest import PROMPTS, greedy_reference

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_compiled_engine_follows_pushes_both_ways(tiny_dir, original, trained, monkeypatch):
    from rollout.vllm_engine import VLLMEngine

    monkeypatch.setitem(os.environ, "VLLM_CPU_KVCACHE_SPACE", "1")
    engine = VLLMEngine(tiny_dir, dtype="float32", enforce_eager=False)
    try:
        params = SamplingParams(temperature=0, max_tokens=10)
        def answers():  # completions also carry the weight version, which every push changes
            return [[c.token_ids for c in samples] for samples in engine.generate(PROMPTS, params)]

        before = answers()
        for model in (trained, original):
            engine.update_weights(model.named_parameters())
            for prompt, (c,) in zip(PROMPTS, engine.generate(PROMPTS, params), strict=True):
                tokens, lps = greedy_reference(model, render_prompt(engine.tokenizer, prompt), 10, engine.eos_ids)
                assert list(c.token_ids) == tokens
                torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(lps), atol=1e-4, rtol=0)
            changed = answers() != before
            assert changed == (model is trained)  # the trained weights do answer differently
    finally:
        engine.close()
