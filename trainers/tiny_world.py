"""A world task a tiny model can learn on one CPU core, with the real reward (tests, benchmarks).

Two things are shrunk, nothing on the reward side:

- `keyed_rows`: each RL row's ~2,500-token agent prompt is replaced by a short key naming the
  agent and the session ("episodic memory, world-0-000 world-0-000-s2"). A 0.5M-parameter model
  cannot read a session, but it can tell sessions apart by key; the reward never reads the
  prompt, so the task is unchanged: write operations for this session whose memory answers its
  questions.
- `warm_start`: the starting policy is the tiny model fine-tuned by plain next-token loss on three
  answers per prompt: the session's own expert operations, another session's expert operations
  for the same agent (valid JSON, wrong facts: a lower task reward) and the own expert's first
  half (invalid JSON: reward 0). It samples all three, so its groups have reward variance, and
  what RL has to learn is real: which of its behaviours the session reward prefers.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from trainers.data.rl_rows import RLRow


def keyed_rows(rows: Sequence[RLRow], agents: Sequence[str]) -> list[RLRow]:
    """The rows of `agents`, each prompt replaced by a short key naming its agent and session."""
    return [
        replace(r, prompt=({"role": "user", "content": f"{r.agent} memory, {r.conversation_id} {r.session_id}"},))
        for r in rows
        if r.agent in agents
    ]


def warm_start(model_dir: str | Path, rows: Sequence[RLRow], out: str | Path, *, steps: int = 2000,
               lr: float = 1e-2, seed: int = 0) -> Path:
    """Fine-tune `model_dir` on own-expert / other-session / broken answers per row; save to `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainers.sft_data import SFTPair, render_pair

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    pairs = []
    for i, row in enumerate(rows):
        others = [o for o in rows if o.agent == row.agent and o.expert_output != row.expert_output]
        targets = [row.expert_output]
        if others:
            targets.append(others[i % len(others)].expert_output)
        targets.append(row.expert_output[: len(row.expert_output) // 2])
        for target in targets:
            pairs.append(render_pair(tokenizer, SFTPair(messages=tuple(row.prompt), target=target)))
    random.Random(seed).shuffle(pairs)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        prompt, target = pairs[step % len(pairs)]
        ids = torch.tensor([prompt + target])
        labels = torch.tensor([[-100] * len(prompt) + target])
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
