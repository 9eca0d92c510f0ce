"""Peers for the cross-process tests, in a module light enough for a spawned child to import."""

from __future__ import annotations

import torch

from rollout.weight_sync import WeightTransport, tensor_metas


def payload(seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        ("a", torch.randn(3, 5, generator=g)),
        ("b", torch.randn(7, generator=g).to(torch.bfloat16)),
        ("c", torch.randn(300, generator=g).to(torch.float16)),
        ("d", torch.randn(4, 6, generator=g).t()),  # not contiguous
    ]


def receive_and_compare(port: int, rounds: int) -> None:
    """Each round: receive what rank 0 sends for `payload(0)`, report 0 if bit-exact, else 1."""
    transport = WeightTransport("127.0.0.1", port, rank=1, world_size=2, backend="gloo", timeout_s=60)
    for _ in range(rounds):
        expected = payload(0)
        got = transport.receive(tensor_metas(expected), bucket_bytes=256)
        same = [n for n, _ in got] == [n for n, _ in expected] and all(
            g.dtype == e.dtype and torch.equal(g, e) for (_, g), (_, e) in zip(got, expected, strict=True)
        )
        transport.reduce_status(0 if same else 1)
    transport.close()


def perturbed_model(model_dir: str, seed: int, scale: float = 0.05):
    """The checkpoint at `model_dir` plus seeded noise: the same bits in every process."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def push_perturbed(url: str, model_dir: str, seed: int) -> None:
    """Act as a trainer in its own process: join the server's weight-sync group and push once."""
    from rollout.client import RemoteEngine

    client = RemoteEngine(url)
    client.connect_weights(timeout_s=120)
    client.update_weights(perturbed_model(model_dir, seed).named_parameters(), bucket_bytes=2**20)
    client.close()
