"""Optimizer and learning-rate schedule shared by the trainers (`sft.py`, `adrpo.py`).

AdamW over the trainable parameters, weight decay on matrices only; the schedule is a linear
warmup followed by a cosine decay to `min_lr_ratio * lr` (`OptimConfig.schedule = "cosine"`, the
SFT recipe) or a constant rate (`"constant"`, the paper's RL run).
"""

from __future__ import annotations

import torch
from transformers import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

from trainers.config import OptimConfig


def build_optimizer(model: torch.nn.Module, o: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (all of them, or the LoRA adapter).

    Weight decay applies to matrices only; norm weights and biases (1-D) are not decayed.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, o: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule of `o.schedule` over `total_steps` optimizer steps."""
    if o.schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=o.warmup_steps)
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        num_warmup_steps=o.warmup_steps,
        num_training_steps=total_steps,
        min_lr_rate=o.min_lr_ratio,
    )
