"""Group-relative advantages (GRPO / ADRPO) and their expansion to tokens. Pure functions.

A group is the G samples of one (session, agent) prompt. Within a group,

    A_i = (R_i - mean(R)) / (std(R) + eps)

over the group's valid samples only. A sample whose reward could not be computed (masked) takes
no part in the statistics and gets advantage 0; its tokens should also be masked out of the loss.

Which std: the unbiased one (Bessel's correction, divide by n - 1), because the paper's code
trains through veRL, whose GRPO advantage uses `torch.std` (unbiased) with eps = 1e-6; with G = 8
the two differ by a factor sqrt(8/7) ~ 1.069 on every advantage, which changes the effective step
size. Groups with fewer than 2 valid samples, or whose valid rewards are all equal, give
advantage 0 for every sample (there is no relative signal, and 0 / eps would only amplify
round-off).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_groups(rewards: Tensor, valid: Tensor | None) -> Tensor:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, G], got shape {tuple(rewards.shape)}")
    if valid is None:
        valid = torch.ones_like(rewards, dtype=torch.bool)
    if valid.shape != rewards.shape or valid.dtype != torch.bool:
        raise ValueError(
            f"valid must be a bool tensor of rewards' shape {tuple(rewards.shape)}, "
            f"got {valid.dtype} {tuple(valid.shape)}"
        )
    if not torch.isfinite(rewards[valid]).all():
        raise ValueError("rewards of valid samples must be finite; mask failed samples with `valid` instead")
    return valid


def degenerate_groups(
    rewards: Tensor,  # [M, G]
    valid: Tensor | None = None,  # [M, G] bool
) -> Tensor:  # [M] bool
    """Groups without relative signal: fewer than 2 valid samples, or all valid rewards equal."""
    valid = _check_groups(rewards, valid)
    big = torch.finfo(rewards.dtype).max if rewards.is_floating_point() else torch.iinfo(rewards.dtype).max
    hi = torch.where(valid, rewards, -big).amax(dim=1)
    lo = torch.where(valid, rewards, big).amin(dim=1)
    return (valid.sum(dim=1) < 2) | (hi == lo)


def group_advantages(
    rewards: Tensor,  # [M, G] one row per (session, agent) group
    valid: Tensor | None = None,  # [M, G] bool, False for samples whose reward failed
    eps: float = 1e-6,
) -> Tensor:  # [M, G] float32
    """`(R - mean) / (std + eps)` per group over valid samples (unbiased std); 0 where masked."""
    valid = _check_groups(rewards, valid)
    r = torch.where(valid, rewards.float(), 0.0)
    n = valid.sum(dim=1, keepdim=True).float()
    mean = r.sum(dim=1, keepdim=True) / n.clamp(min=1.0)
    centred = torch.where(valid, r - mean, 0.0)
    std = torch.sqrt((centred**2).sum(dim=1, keepdim=True) / (n - 1.0).clamp(min=1.0))
    adv = centred / (std + eps)
    flat = degenerate_groups(rewards, valid)[:, None]
    return torch.where(valid & ~flat, adv, 0.0)


def expand_to_tokens(
    per_sample: Tensor,  # [B] one value per sequence (advantage or attribution weight)
    mask: Tensor,  # [B, T] bool completion/loss mask
) -> Tensor:  # [B, T] float32, the sample's value on its unmasked tokens, 0 elsewhere
    """Broadcast a per-sample value onto that sample's tokens."""
    if per_sample.dim() != 1 or mask.dim() != 2 or per_sample.shape[0] != mask.shape[0]:
        raise ValueError(
            f"per_sample must be [B] and mask [B, T] with the same B, "
            f"got {tuple(per_sample.shape)} and {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    return torch.where(mask, per_sample.float()[:, None], 0.0)
