"""Shared fixtures and independent references for the rollout tests.

The references use nothing from `rollout`: a plain forward pass of a transformers model over the
unpadded prompt + completion gives the log-probs every backend must reproduce, and a loop of
full forward passes with argmax gives greedy completions.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainers.tiny import save_tiny_policy


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return save_tiny_policy(tmp_path_factory.mktemp("tiny_policy"), seed=0)


@pytest.fixture(scope="module")
def original(tiny_dir):
    """The tiny policy as saved: what an engine loads at start."""
    return load_model(tiny_dir)


@pytest.fixture(scope="module")
def trained(tiny_dir):
    """The policy after one optimizer step: the weights a trainer would push."""
    model = load_model(tiny_dir)
    train_step(model, load_tokenizer(tiny_dir))
    return model


def load_model(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def load_tokenizer(path):
    return AutoTokenizer.from_pretrained(str(path))


@torch.no_grad()
def forward_logprobs(model: torch.nn.Module, prompt_ids, token_ids) -> Tensor:
    """[T] log p(token_t | prompt, tokens_<t) from one forward pass, temperature 1."""
    ids = torch.tensor([list(prompt_ids) + list(token_ids)])
    logp = torch.log_softmax(model(ids).logits.float()[0], dim=-1)  # [P + T, V]
    p = len(prompt_ids)
    return logp[p - 1 : -1].gather(-1, torch.tensor(list(token_ids))[:, None])[:, 0]


@torch.no_grad()
def greedy_reference(model: torch.nn.Module, prompt_ids, max_tokens: int, eos_ids=()) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probs, one full forward pass per step (no KV cache, no padding)."""
    ids, out, lps = list(prompt_ids), [], []
    for _ in range(max_tokens):
        logp = torch.log_softmax(model(torch.tensor([ids])).logits.float()[0, -1], dim=-1)
        tok = int(logp.argmax())
        out.append(tok)
        lps.append(float(logp[tok]))
        ids.append(tok)
        if tok in eos_ids:
            break
    return out, lps


def train_step(model: torch.nn.Module, tokenizer, lr: float = 1e-2, params=None) -> None:
    """One AdamW step of next-token loss on a fixed sentence: a small, real change of every weight."""
    ids = torch.tensor([tokenizer("Caroline went to a support group on 7 May 2023.")["input_ids"]])
    opt = torch.optim.AdamW(params if params is not None else model.parameters(), lr=lr)
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()


PROMPTS = [
    [{"role": "user", "content": "Caroline: Hey Mel! How have you been?"}],
    "Session date: 8 May 2023. Speakers: Caroline and Melanie.",
    [
        {"role": "system", "content": "You are the episodic memory agent."},
        {"role": "user", "content": "Melanie paints."},
    ],
    [5, 17, 300, 42],
]
