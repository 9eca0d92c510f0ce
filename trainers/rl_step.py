"""The model side of an ADRPO step: old / reference log-probs, then the policy update(s).

`prepare_policy_batch` turns the step's trainable samples into shared-prompt micro-batches
(`trainers.packing`: each (session, agent) prompt computed once for its G completions, micro-
batches by position budget) and, before any update, computes per completion token:
- `logp_old`: the policy's log-prob at the sampling temperature (logits / T), with the weights
  that generated the rollout (the engine was last synced to them);
- `logp_ref`: the frozen reference's, at the same temperature (when beta > 0);
- the policy's temperature-1 log-prob, compared with the engine's (temperature 1) for the
  mismatch metrics and the truncated importance-sampling factor;
- the entropy of the tempered distribution (a metric).
It also fixes the step's global normaliser: the completion tokens (token mean) or sequences (the
per-sequence aggregations) of all micro-batches of all processes. Each micro-batch's loss, a mean
over its own tokens or sequences, is multiplied by `local count / global count`, which makes the
accumulated gradient that of the whole step's mean, whatever the split.

`policy_update` runs `loss.updates_per_batch` optimizer steps over the micro-batches.

Every process runs the same number of micro-batches (the largest count, padded with empty ones
that contribute nothing), because under FSDP2 each forward gathers parameters collectively.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from trainers.adrpo_config import ADRPOConfig
from trainers.distributed import accumulation_sync, all_reduce_sum
from trainers.fused_loss import fused_policy_loss
from trainers.logprobs import lm_head_params, token_logprobs
from trainers.losses import Aggregation
from trainers.packing import PromptGroup, completion_hidden_states, completion_logprobs, split_by_token_budget
from trainers.rl_batch import Sample, TISLevel, tis_weights


@dataclass
class MicroData:
    """One forward's worth of the step: its groups and per-token loss inputs (all [N])."""

    groups: tuple[PromptGroup, ...]
    old_logp: Tensor
    ref_logp: Tensor | None
    advantages: Tensor
    weights: Tensor  # attribution weight x truncated importance-sampling factor
    mask: Tensor  # bool
    factor: float  # local count / global count of the step's normaliser


@dataclass
class PolicyBatch:
    micro: list[MicroData]
    global_tokens: float  # completion tokens in the loss, all processes
    global_seqs: float  # sequences in the loss, all processes
    metrics: dict[str, float] = field(default_factory=dict)


def _all_reduce_max(value: Tensor) -> Tensor:
    out = value.clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def _prompt_groups(trainable: Sequence[Sample]) -> list[PromptGroup]:
    """Consecutive samples of one group with the same prompt tokens -> one PromptGroup (same order).

    The G samples of a dense (session, agent) group share their prompt and pack into one group;
    an on-policy trajectory's samples (sparse rewards) each have their own prompt and pack alone.
    """
    runs: list[list[Sample]] = []
    for s in trainable:
        last = runs[-1][0] if runs else None
        if last is not None and last.group == s.group and last.completion.prompt_token_ids == s.completion.prompt_token_ids:
            runs[-1].append(s)
        else:
            runs.append([s])
    return [PromptGroup(list(run[0].completion.prompt_token_ids), [list(s.completion.token_ids) for s in run]) for run in runs]


def prepare_policy_batch(
    model: nn.Module,
    ref_model: nn.Module | None,
    samples: Sequence[Sample],
    cfg: ADRPOConfig,
    *,
    pad_id: int,
) -> PolicyBatch:
    """Micro-batches with old / reference log-probs, TIS weights and the global normaliser."""
    trainable = [s for s in samples if s.mask is None]
    groups = _prompt_groups(trainable)
    layout, chunk, temperature = cfg.loss.layout, cfg.loss.chunk_size, cfg.rollout.temperature
    splits = split_by_token_budget(groups, cfg.loss.micro_batch_tokens, layout=layout) if groups else []
    device = next(model.parameters()).device
    n_micro = int(_all_reduce_max(torch.tensor(max(len(splits), 1), device=device)))
    local = torch.tensor([sum(s.num_tokens for s in trainable), len(trainable)], dtype=torch.float64, device=device)
    global_tokens, global_seqs = all_reduce_sum(local).tolist()
    per_token = Aggregation(cfg.loss.aggregation) is Aggregation.TOKEN_MEAN
    tis_level = TISLevel(cfg.rollout.tis_level)
    log_cap = math.log(cfg.rollout.tis_cap)

    sums = dict.fromkeys(["tokens", "entropy", "abs_diff", "k3", "tis", "tis_capped"], 0.0)
    micro: list[MicroData] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for k in range(n_micro):
            if k < len(splits):
                mb_groups, sample_ids = splits[k].groups, list(splits[k].sample_ids)
            else:  # an empty micro-batch: same collectives as the other processes, nothing to learn
                mb_groups, sample_ids = (PromptGroup([pad_id], [[]]),), []
            states = completion_hidden_states(model, mb_groups, layout=layout)
            weight, bias = lm_head_params(model)
            old, entropy = token_logprobs(states.hidden, weight, states.token_ids, bias, temperature, chunk, True)
            current_t1, _ = token_logprobs(states.hidden, weight, states.token_ids, bias, 1.0, chunk)
            ref = None
            if ref_model is not None:
                ref, _ = completion_logprobs(ref_model, mb_groups, temperature=temperature, layout=layout, chunk_size=chunk)
            chosen = [trainable[i] for i in sample_ids]
            engine = torch.tensor(
                [lp for s in chosen for lp in s.completion.logprobs], dtype=torch.float32, device=old.device
            )
            tok_sample = torch.tensor(sample_ids, dtype=torch.long, device=old.device)[states.seq_index]
            adv = torch.tensor([s.advantage for s in trainable], dtype=torch.float32, device=old.device)
            attribution = torch.tensor([s.weight for s in trainable], dtype=torch.float32, device=old.device)
            tis = tis_weights(current_t1, engine, states.seq_index, states.num_seqs, tis_level, cfg.rollout.tis_cap)
            n_tokens = int(old.numel())
            diff = (current_t1 - engine).double()
            sums["tokens"] += n_tokens
            sums["entropy"] += float(entropy.double().sum())
            sums["abs_diff"] += float(diff.abs().sum())
            # KL(engine || trainer) from engine samples: k3 with r = p_trainer / p_engine.
            sums["k3"] += float((diff.exp() - 1 - diff).sum())
            sums["tis"] += float(tis.double().sum())
            sums["tis_capped"] += float((diff > log_cap).sum()) if tis_level is TISLevel.TOKEN else 0.0
            local_count = n_tokens if per_token else len(chosen)
            global_count = global_tokens if per_token else global_seqs
            micro.append(
                MicroData(
                    groups=tuple(mb_groups),
                    old_logp=old,
                    ref_logp=ref,
                    advantages=adv[tok_sample] if n_tokens else old.new_zeros(0),
                    weights=(attribution[tok_sample] if n_tokens else old.new_zeros(0)) * tis,
                    mask=torch.ones(n_tokens, dtype=torch.bool, device=old.device),
                    factor=local_count / global_count if global_count > 0 else 0.0,
                )
            )
    model.train(was_training)
    keys = sorted(sums)
    total = dict(zip(keys, all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)).tolist()))
    n = total["tokens"]
    metrics = {
        "train/micro_batches": float(n_micro),
        "train/entropy_mean": total["entropy"] / n if n else float("nan"),
        "rollout/mismatch_abs_logp": total["abs_diff"] / n if n else float("nan"),
        "rollout/mismatch_kl": total["k3"] / n if n else float("nan"),
        "rollout/tis_mean": total["tis"] / n if n else float("nan"),
        "rollout/tis_capped_frac": total["tis_capped"] / n if n else float("nan"),
    }
    return PolicyBatch(micro, global_tokens, global_seqs, metrics)


def policy_update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    accelerator: Accelerator,
    batch: PolicyBatch,
    cfg: ADRPOConfig,
    *,
    step: bool = True,
) -> dict[str, float]:
    """`loss.updates_per_batch` optimizer steps on the batch; returns loss metrics.

    With `step=False` only the gradients of one pass are accumulated (no clip, no optimizer
    step), for tests that compare gradients across splits.
    """
    loss_cfg = cfg.loss.policy_loss_config()
    acc = accelerator
    metrics: dict[str, float] = {"train/loss_tokens": batch.global_tokens, "train/loss_sequences": batch.global_seqs}
    if batch.global_tokens == 0:
        # Nothing to learn from anywhere (every sample masked or empty): no step at all, rather
        # than one that would only apply weight decay and stale momentum.
        metrics["train/skipped_update"] = 1.0
        return metrics
    sums = dict.fromkeys(["loss", "tokens", "clip_low", "clip_high", "clip_dual", "kl"], 0.0)
    extremes = [-math.inf, -math.inf]  # max ratio, -min ratio
    grad_norm = torch.tensor(float("nan"))
    lr = scheduler.get_last_lr()[0]
    model.train()
    updates = cfg.loss.updates_per_batch if step else 1
    optimizer_s = 0.0  # clip + optimizer step, apart from forward/backward (adrpo_step.md)
    for update in range(updates):
        for k, mb in enumerate(batch.micro):
            last = k == len(batch.micro) - 1
            # DDP reduces on the last micro-batch only; FSDP2 as `distributed.grad_accum_sync` says.
            with accumulation_sync(acc, model, cfg.distributed, last):
                states = completion_hidden_states(model, mb.groups, layout=cfg.loss.layout)
                weight, bias = lm_head_params(model)
                loss, m = fused_policy_loss(
                    states.hidden, weight, states.token_ids, mb.old_logp, mb.advantages, mb.weights, mb.mask,
                    states.seq_index, states.num_seqs, loss_cfg,
                    head_bias=bias, ref_logp=mb.ref_logp, temperature=cfg.rollout.temperature,
                    chunk_size=cfg.loss.chunk_size,
                )  # fmt: skip
                # DDP/FSDP average gradients over processes; times their number gives the sum
                # that the step's global mean needs.
                acc.backward(loss * (mb.factor * acc.num_processes))
            n = m["num_tokens"]
            if update == 0:
                sums["loss"] += float(loss.detach()) * mb.factor
            sums["tokens"] += n
            sums["clip_low"] += m["clip_frac_low"] * n
            sums["clip_high"] += m["clip_frac_high"] * n
            sums["clip_dual"] += m["clip_frac_dual"] * n
            if n and "kl_mean" in m:
                sums["kl"] += m["kl_mean"] * n
            if n:
                extremes = [max(extremes[0], m["ratio_max"]), max(extremes[1], -m["ratio_min"])]
        if not step:
            break
        started = time.perf_counter()
        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
        grad_norm = acc.clip_grad_norm_(model.parameters(), max_norm)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        optimizer_s += time.perf_counter() - started

    device = batch.micro[0].old_logp.device
    keys = sorted(sums)
    total = dict(zip(keys, all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)).tolist()))
    ext = _all_reduce_max(torch.tensor(extremes, dtype=torch.float64, device=device)).tolist()
    n = total["tokens"]
    metrics.update(
        {
            "train/loss": total["loss"],
            "train/clip_frac_low": total["clip_low"] / n,
            "train/clip_frac_high": total["clip_high"] / n,
            "train/clip_frac_dual": total["clip_dual"] / n,
            "train/ratio_max": ext[0],
            "train/ratio_min": -ext[1],
            "train/grad_norm": float(grad_norm),
            "train/lr": lr,
            "time/optimizer_s": optimizer_s,
        }
    )
    if batch.micro[0].ref_logp is not None:
        metrics["train/kl_mean"] = total["kl"] / n
    return metrics
