"""Adapter-only weight sync into vLLM's LoRA support (`VLLMEngine.update_adapter`)."""

from __future__ import annotations

import pytest
import torch

from rollout.chat import render_prompt
from rollout.types import SamplingParams, WeightSyncError
from tests.rollout.conftest import PROMPTS, forward_logprobs, load_model
from tests.rollout.test_lora import lora_policy

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_adapter_only_sync_generates_as_the_adapted_policy(tiny_dir, monkeypatch):
    from rollout.vllm_engine import VLLMEngine

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    policy = lora_policy(tiny_dir)  # r=4 on q_proj, v_proj, down_proj, one optimizer step
    engine = VLLMEngine(tiny_dir, dtype="float32", enable_lora=True, max_lora_rank=8, max_loras=1)
    try:
        prompt = render_prompt(engine.tokenizer, PROMPTS[0])
        params = SamplingParams(n=2, max_tokens=8, seed=3)
        (before, _) = engine.generate([PROMPTS[0]], params)[0]
        # The check has power: the base model's log-probs are far from the adapted policy's.
        assert (forward_logprobs(policy, prompt, before.token_ids) - torch.tensor(before.logprobs)).abs().max() > 1e-3
        engine.update_adapter(policy)
        for c in engine.generate([PROMPTS[0]], params)[0]:
            assert c.weight_version == 1
            # vLLM adds x @ A.T @ B.T * scale beside the base matmul: equal to the merged policy
            # up to float32 rounding.
            ref = forward_logprobs(policy, prompt, c.token_ids)
            torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=0)
        second = lora_policy(tiny_dir)  # another step from a fresh adapter: different weights
        with torch.no_grad():
            for n, p in second.named_parameters():
                if "lora_B" in n:
                    p.mul_(3.0)
        engine.update_adapter(second, version=7)
        (c, _) = engine.generate([PROMPTS[0]], params)[0]
        assert c.weight_version == 7
        torch.testing.assert_close(
            torch.tensor(c.logprobs), forward_logprobs(second, prompt, c.token_ids), atol=1e-4, rtol=0
        )
        with pytest.raises(WeightSyncError, match="takes a peft model"):
            engine.update_adapter(load_model(tiny_dir))
    finally:
        engine.close()
