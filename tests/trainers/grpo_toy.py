"""A toy GRPO loop on a causal LM, used by the learning tests (single process and FSDP2).

Kept in the tests as a minimal check of the fused loss under FSDP2; the real loop is
`trainers/adrpo.py` (tests/trainers/test_adrpo*.py).

Each step: sample G completions of fixed length for each prompt, reward each completion by the
share of its tokens that fall in a target set, compute group advantages, take the sampling
policy's log-probs as `old_logp` (on-policy), and take `updates_per_batch` optimizer steps on the
fused ADRPO policy loss. Completions have a fixed length (`min_new_tokens = max_new_tokens`) so
that every process runs the same number of forwards: FSDP2 gathers parameters collectively in
each forward, and ranks that stopped at different lengths would hang.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from trainers.advantages import group_advantages
from trainers.fused_loss import fused_policy_loss
from trainers.logprobs import lm_head_params, pack_completions, policy_hidden_states, sequence_logprobs
from trainers.losses import PolicyLossConfig

DEFAULT_PROMPTS = ("Write the memory.", "Caroline: Hey Mel! How have you been?")


@dataclass
class ToyGRPOResult:
    mean_rewards: list[float] = field(default_factory=list)  # one per step, over all processes
    metrics: list[dict[str, float]] = field(default_factory=list)  # loss metrics of each step


def target_share_reward(
    completions: Tensor,  # [S, K] token ids
    target_ids: Tensor,  # [n_targets] token ids that earn reward
) -> Tensor:  # [S] float32 in [0, 1]
    """Share of each completion's tokens that belong to the target set."""
    return torch.isin(completions, target_ids).float().mean(dim=1)


def _sample(
    model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, group_size: int, max_new_tokens: int, temperature: float
) -> Tensor:  # [P * G, Lp + K], the G samples of each prompt consecutive
    return model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        num_return_sequences=group_size,
    )


def run_toy_grpo(
    model: nn.Module,
    tokenizer,
    steps: int,
    *,
    target_ids: Sequence[int],
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    group_size: int = 8,
    max_new_tokens: int = 12,
    temperature: float = 1.0,
    lr: float = 3e-3,
    updates_per_batch: int = 1,
    loss_config: PolicyLossConfig | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    accelerator=None,
    seed: int = 0,
    progress: bool = False,
) -> ToyGRPOResult:
    """Train `model` in place by GRPO on the target-share reward; returns per-step mean rewards.

    Without `accelerator`, runs in this process (AdamW at `lr` unless `optimizer` is given).
    With one, the model (and the optimizer, created here if not given) go through
    `accelerator.prepare` inside, gradients through `accelerator.backward`, and the reported mean
    reward is averaged over processes; each process samples with its own seed.
    """
    if steps < 1 or group_size < 2 or max_new_tokens < 1:
        raise ValueError(
            f"need steps >= 1, group_size >= 2, max_new_tokens >= 1; got {steps}, {group_size}, {max_new_tokens}"
        )
    if not target_ids:
        raise ValueError("target_ids must name at least one token")
    loss_config = loss_config or PolicyLossConfig()
    if loss_config.beta != 0.0:
        raise ValueError("the toy loop has no reference model: use a loss_config with beta=0")
    if optimizer is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rank = 0
    if accelerator is not None:
        model, optimizer = accelerator.prepare(model, optimizer)
        rank = accelerator.process_index
    device = next(model.parameters()).device
    targets = torch.tensor(list(target_ids), dtype=torch.long, device=device)

    tokenizer.padding_side = "left"
    rendered = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    enc = tokenizer(rendered, return_tensors="pt", padding=True)
    prompt_ids, prompt_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    prompt_len = prompt_ids.shape[1]

    result = ToyGRPOResult()
    for step in tqdm(range(steps), desc="toy GRPO", disable=not progress):
        torch.manual_seed(seed + 1000 * step + rank)
        model.eval()
        with torch.no_grad():
            sequences = _sample(model, prompt_ids, prompt_mask, group_size, max_new_tokens, temperature)
        attention_mask = torch.cat(
            [prompt_mask.repeat_interleave(group_size, dim=0), torch.ones_like(sequences[:, prompt_len:])], dim=1
        )
        completion_mask = torch.zeros_like(sequences, dtype=torch.bool)
        completion_mask[:, prompt_len:] = True
        rewards = target_share_reward(sequences[:, prompt_len:], targets)
        advantages = group_advantages(rewards.view(len(prompts), group_size)).view(-1)
        old_logp, _ = sequence_logprobs(model, sequences, attention_mask, completion_mask, temperature)

        model.train()
        for _ in range(updates_per_batch):
            hidden = policy_hidden_states(model, sequences, attention_mask)
            packed = pack_completions(hidden, sequences, completion_mask)
            head_weight, head_bias = lm_head_params(model)
            loss, metrics = fused_policy_loss(
                packed.hidden,
                head_weight,
                packed.token_ids,
                old_logp[completion_mask],
                advantages[packed.seq_index],
                torch.ones_like(old_logp[completion_mask]),
                torch.ones_like(packed.token_ids, dtype=torch.bool),
                packed.seq_index,
                packed.num_seqs,
                loss_config,
                head_bias=head_bias,
                temperature=temperature,
            )
            if accelerator is not None:
                accelerator.backward(loss)
            else:
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        mean_reward = rewards.mean()
        if accelerator is not None:
            mean_reward = accelerator.reduce(mean_reward, reduction="mean")
        result.mean_rewards.append(float(mean_reward))
        result.metrics.append({**metrics, "loss": float(loss.detach())})
    return result
