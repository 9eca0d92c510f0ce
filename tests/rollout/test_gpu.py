"""GPU-only paths: vLLM sleep / push / wake, the NCCL transport, the transformers engine on CUDA.

Deselected by default (`-m 'not gpu'`); run with `pytest -m gpu tests/rollout/test_gpu.py` on a
machine with the official vllm package and one GPU (two for the NCCL test).
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from rollout.chat import render_prompt
from rollout.hf_engine import HFEngine
from rollout.types import SamplingParams
from rollout.weight_sync import WeightTransport, tensor_metas
from tests.rollout.conftest import PROMPTS, forward_logprobs, greedy_reference, load_model
from tests.rollout.gloo_peer import payload, perturbed_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.vllm
def test_vllm_sleep_push_wake_is_exact(tiny_dir):
    from rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(tiny_dir, dtype="float32", gpu_memory_utilization=0.3)
    try:
        prompt = render_prompt(engine.tokenizer, PROMPTS[0])
        for level, seed in ((1, 1), (2, 2)):
            pushed = perturbed_model(str(tiny_dir), seed)
            free_awake = torch.cuda.mem_get_info()[0]
            engine.sleep(level=level)
            assert torch.cuda.mem_get_info()[0] > free_awake  # the KV cache (at least) was released
            engine.update_weights((n, p.cuda()) for n, p in pushed.named_parameters())
            engine.wake_up()
            (c,) = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=10))[0]
            tokens, lps = greedy_reference(pushed, prompt, 10, engine.eos_ids)
            assert list(c.token_ids) == tokens
            torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(lps), atol=1e-3, rtol=0)
        engine.sleep(level=2)
        with pytest.raises(RuntimeError, match="push weights before wake_up"):
            engine.wake_up()
    finally:
        engine.close()


def test_hf_engine_on_cuda_matches_a_cpu_forward(tiny_dir):
    engine = HFEngine(tiny_dir, device="cuda")
    reference = load_model(tiny_dir)
    for prompt, samples in zip(
        PROMPTS, engine.generate(PROMPTS, SamplingParams(n=2, max_tokens=8, seed=0)), strict=True
    ):
        ids = render_prompt(engine.tokenizer, prompt)
        for c in samples:
            torch.testing.assert_close(
                torch.tensor(c.logprobs), forward_logprobs(reference, ids, c.token_ids), atol=1e-3, rtol=0
            )


def _nccl_receiver(port: int) -> None:
    transport = WeightTransport("127.0.0.1", port, rank=1, world_size=2, backend="nccl", device="cuda:1", timeout_s=120)
    expected = payload(0)
    got = transport.receive(tensor_metas(expected), bucket_bytes=256)
    same = all(torch.equal(g.cpu(), e) for (_, g), (_, e) in zip(got, expected, strict=True))
    transport.reduce_status(0 if same else 1)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per process")
def test_nccl_transport_is_bit_exact():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    child = mp.get_context("spawn").Process(target=_nccl_receiver, args=(port,))
    child.start()
    sender = WeightTransport("127.0.0.1", port, rank=0, world_size=2, backend="nccl", device="cuda:0", timeout_s=120)
    sender.send([(n, t.cuda(0)) for n, t in payload(0)], bucket_bytes=256)
    assert sender.reduce_status(0) == 0
    child.join(timeout=120)
    assert child.exitcode == 0
