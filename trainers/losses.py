"""The ADRPO policy loss: a plain-PyTorch reference over padded `[B, T]` completions.

Per completion token t of sample i (section 7 of the design):

    rho    = exp(logp - logp_old)
    pg     = -w_i * min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)
    kl     = exp(logp_ref - logp) - (logp_ref - logp) - 1          (the k3 estimator, >= 0)
    loss_t = pg + beta * kl

`w_i` is the sample's attribution weight (alpha for the dominant kind's agent, else 1): it
multiplies the advantage, so it scales the clipped and the unclipped surrogate alike and never the
KL term (DESIGN section 6; what the paper's run did). A trainer may fold a per-token truncated
importance-sampling factor into `w` as well: it too belongs to the policy-gradient term only.

Two bounds the paper's run (veRL) had, both off in `PolicyLossConfig()` and on in the ADRPO
trainer's defaults:
- dual clip `c` (> 1): for A < 0 the surrogate is bounded below by `c * A`,
  `pg = -w * max(min(rho * A, clip(rho) * A), c * A)`, so a token whose ratio has run far above
  1 cannot push the loss without limit;
- `kl_clamp`: the k3 value is clamped to `[-kl_clamp, kl_clamp]` (k3 >= 0, so only the top bites)
  after clamping the log-ratio `ref - logp` to +-20, as veRL's "low_var_kl" does; a clamped token
  gets no KL gradient.

The per-token losses are aggregated by `PolicyLossConfig.aggregation`. Every aggregation is
written as a per-token scale, `loss = sum_t scale_t * loss_t`, so the reference here and the
fused kernel (`trainers.fused_loss`) share one definition of it:

- `SEQ_MEAN_TOKEN_MEAN` (the paper, GRPO): mean over a sequence's tokens, then mean over
  sequences;
- `TOKEN_MEAN`: mean over all tokens of the batch (long completions count more);
- `SEQ_SUM_NORM`: each sequence's token sum divided by a fixed `norm_length`, then mean over
  sequences (Dr. GRPO: no length bias from the normaliser).

A sequence with no unmasked token (a failed sample masked out of the loss) takes no part: it is
not counted among the sequences that are averaged.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


class Aggregation(enum.Enum):
    """How per-token losses become one scalar."""

    SEQ_MEAN_TOKEN_MEAN = "seq_mean_token_mean"
    TOKEN_MEAN = "token_mean"
    SEQ_SUM_NORM = "seq_sum_norm"


@dataclass(frozen=True)
class PolicyLossConfig:
    """Hyperparameters of the ADRPO policy loss (paper: clip 0.2, KL coefficient 0.02)."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.0
    aggregation: Aggregation = Aggregation.SEQ_MEAN_TOKEN_MEAN
    # Only read by Aggregation.SEQ_SUM_NORM: the fixed length that divides each sequence's sum.
    norm_length: int | None = None
    # Dual-clip constant c > 1 (None: off); the paper's run used 3.
    dual_clip: float | None = None
    # Bound on the per-token k3 value (None: off); the paper's run used 10.
    kl_clamp: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.aggregation, Aggregation):
            raise TypeError(f"aggregation must be an Aggregation, got {self.aggregation!r}")
        if not 0.0 <= self.eps_low < 1.0:
            raise ValueError(f"eps_low must be in [0, 1), got {self.eps_low}")
        if self.eps_high < 0.0:
            raise ValueError(f"eps_high must be >= 0, got {self.eps_high}")
        if self.beta < 0.0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1 (or None), got {self.dual_clip}")
        if self.kl_clamp is not None and not self.kl_clamp > 0.0:
            raise ValueError(f"kl_clamp must be > 0 (or None), got {self.kl_clamp}")
        if self.aggregation is Aggregation.SEQ_SUM_NORM:
            if self.norm_length is None or self.norm_length <= 0:
                raise ValueError(
                    f"Aggregation.SEQ_SUM_NORM needs a positive norm_length, got {self.norm_length}"
                )


class TokenTerms(NamedTuple):
    """Per-token pieces of the loss; all share the shape of the log-probs."""

    loss: Tensor  # pg + beta * kl, zero where masked
    ratio: Tensor  # rho, 1 where masked
    clipped_low: Tensor  # bool: rho < 1 - eps_low and the clipped surrogate was taken
    clipped_high: Tensor  # bool: rho > 1 + eps_high and the clipped surrogate was taken
    clipped_dual: Tensor  # bool: A < 0 and the dual-clip bound c * A was taken
    kl: Tensor | None  # k3, zero where masked; None without reference log-probs


def per_token_terms(
    logp: Tensor,  # [...]
    old_logp: Tensor,  # [...]
    advantages: Tensor,  # [...], broadcast to the tokens already
    weights: Tensor,  # [...], broadcast to the tokens already
    mask: Tensor,  # [...] bool
    config: PolicyLossConfig,
    ref_logp: Tensor | None = None,  # [...]
) -> TokenTerms:
    """Elementwise ADRPO loss of each token, before aggregation (differentiable in `logp`).

    Masked positions get log-ratio 0 so that garbage there (padding) cannot produce inf/nan in
    the forward or the backward pass.
    """
    logp32 = logp.float()
    log_ratio = torch.where(mask, logp32 - old_logp.float(), 0.0)
    ratio = torch.exp(log_ratio)
    adv = advantages.float()
    w = weights.float()
    clipped_ratio = ratio.clamp(1.0 - config.eps_low, 1.0 + config.eps_high)
    unclipped = ratio * adv
    clipped = clipped_ratio * adv
    surrogate = torch.minimum(unclipped, clipped)
    # The clip only matters where the clipped surrogate is the smaller one AND it changed rho;
    # there the token gets no gradient from the policy term.
    took_clipped = clipped < unclipped
    clipped_low = mask & took_clipped & (ratio < 1.0 - config.eps_low)
    clipped_high = mask & took_clipped & (ratio > 1.0 + config.eps_high)
    clipped_dual = torch.zeros_like(mask)
    if config.dual_clip is not None:
        bound = config.dual_clip * adv
        clipped_dual = mask & (adv < 0) & (bound > surrogate)
        surrogate = torch.where(adv < 0, torch.maximum(surrogate, bound), surrogate)
    pg = -w * surrogate
    loss = pg
    kl = None
    if ref_logp is not None:
        ref_log_ratio = torch.where(mask, ref_logp.float() - logp32, 0.0)
        if config.kl_clamp is not None:
            ref_log_ratio = ref_log_ratio.clamp(-20.0, 20.0)
        kl = torch.exp(ref_log_ratio) - ref_log_ratio - 1.0
        if config.kl_clamp is not None:
            kl = kl.clamp(-config.kl_clamp, config.kl_clamp)
        if config.beta != 0.0:
            loss = loss + config.beta * kl
    elif config.beta != 0.0:
        raise ValueError(f"beta={config.beta} needs ref_logp (reference log-probs); got None")
    loss = torch.where(mask, loss, 0.0)
    return TokenTerms(
        loss=loss, ratio=ratio, clipped_low=clipped_low, clipped_high=clipped_high, clipped_dual=clipped_dual, kl=kl
    )


def _scales_seq_mean_token_mean(
    mask: Tensor, seq_index: Tensor, num_seqs: int, config: PolicyLossConfig
) -> Tensor:
    m = mask.float()
    counts = torch.zeros(num_seqs, dtype=torch.float32, device=mask.device).index_add_(0, seq_index, m)
    live_seqs = (counts > 0).sum().clamp(min=1)
    return m / (counts[seq_index].clamp(min=1.0) * live_seqs)


def _scales_token_mean(mask: Tensor, seq_index: Tensor, num_seqs: int, config: PolicyLossConfig) -> Tensor:
    m = mask.float()
    return m / m.sum().clamp(min=1.0)


def _scales_seq_sum_norm(mask: Tensor, seq_index: Tensor, num_seqs: int, config: PolicyLossConfig) -> Tensor:
    m = mask.float()
    counts = torch.zeros(num_seqs, dtype=torch.float32, device=mask.device).index_add_(0, seq_index, m)
    live_seqs = (counts > 0).sum().clamp(min=1)
    assert config.norm_length is not None  # checked by PolicyLossConfig
    return m / (live_seqs * float(config.norm_length))


_SCALES: dict[Aggregation, Callable[[Tensor, Tensor, int, PolicyLossConfig], Tensor]] = {
    Aggregation.SEQ_MEAN_TOKEN_MEAN: _scales_seq_mean_token_mean,
    Aggregation.TOKEN_MEAN: _scales_token_mean,
    Aggregation.SEQ_SUM_NORM: _scales_seq_sum_norm,
}


def aggregation_scales(
    mask: Tensor,  # [N] bool
    seq_index: Tensor,  # [N] long, in [0, num_seqs)
    num_seqs: int,
    config: PolicyLossConfig,
) -> Tensor:  # [N] float32
    """Per-token factors such that the aggregated loss is `sum(scale * token_loss)`.

    They depend on the mask and sequence membership only, never on the log-probs, which is what
    lets the fused kernel finish each token chunk's gradient without seeing the other chunks.
    """
    if mask.dim() != 1 or seq_index.shape != mask.shape:
        raise ValueError(
            f"mask and seq_index must be 1-D of one shape, got {tuple(mask.shape)} and {tuple(seq_index.shape)}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if seq_index.dtype != torch.long:
        raise TypeError(f"seq_index must be a long tensor, got {seq_index.dtype}")
    if num_seqs < 1:
        raise ValueError(f"num_seqs must be >= 1, got {num_seqs}")
    if seq_index.numel() and (int(seq_index.min()) < 0 or int(seq_index.max()) >= num_seqs):
        lo, hi = int(seq_index.min()), int(seq_index.max())
        raise ValueError(f"seq_index values must lie in [0, {num_seqs}), got [{lo}, {hi}]")
    return _SCALES[config.aggregation](mask, seq_index, num_seqs, config)


def summarize(
    terms: TokenTerms,
    mask: Tensor,  # same shape as the terms, bool
    entropy: Tensor | None = None,  # same shape, per-token entropy of the sampling distribution
) -> dict[str, float]:
    """Token-mean metrics over unmasked tokens: clip fractions, ratio stats, KL, entropy.

    Ratio min/max/mean, KL and entropy are NaN when no token is unmasked (there is nothing to
    describe, and a made-up number would read as a real one).
    """
    n = int(mask.sum())
    out: dict[str, float] = {"num_tokens": float(n)}
    if n == 0:
        out.update(clip_frac_low=0.0, clip_frac_high=0.0, clip_frac_dual=0.0, ratio_mean=float("nan"))
        out.update(ratio_min=float("nan"), ratio_max=float("nan"))
        if terms.kl is not None:
            out["kl_mean"] = float("nan")
        if entropy is not None:
            out["entropy_mean"] = float("nan")
        return out
    with torch.no_grad():
        ratio = terms.ratio.detach()[mask]
        out["clip_frac_low"] = terms.clipped_low.sum().item() / n
        out["clip_frac_high"] = terms.clipped_high.sum().item() / n
        out["clip_frac_dual"] = terms.clipped_dual.sum().item() / n
        out["ratio_mean"] = ratio.mean().item()
        out["ratio_min"] = ratio.min().item()
        out["ratio_max"] = ratio.max().item()
        if terms.kl is not None:
            out["kl_mean"] = terms.kl.detach()[mask].mean().item()
        if entropy is not None:
            out["entropy_mean"] = entropy.detach().float()[mask].mean().item()
    return out


def policy_loss(
    logp: Tensor,  # [B, T] new log-probs of the sampled tokens
    old_logp: Tensor,  # [B, T] log-probs under the sampling policy
    advantages: Tensor,  # [B] per sequence or [B, T] per token
    weights: Tensor,  # [B] attribution weight per sequence
    mask: Tensor,  # [B, T] bool, True on completion tokens that enter the loss
    config: PolicyLossConfig,
    ref_logp: Tensor | None = None,  # [B, T] reference-model log-probs (needed when beta > 0)
    entropy: Tensor | None = None,  # [B, T] per-token entropy, only reported as a metric
) -> tuple[Tensor, dict[str, float]]:
    """Reference ADRPO policy loss over padded completions; returns `(loss, metrics)`."""
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    bsz, length = logp.shape
    for name, t in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp), ("entropy", entropy)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} must have logp's shape {tuple(logp.shape)}, got {tuple(t.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if weights.shape != (bsz,):
        raise ValueError(f"weights must be [B]=[{bsz}] (one per sequence), got {tuple(weights.shape)}")
    if advantages.shape == (bsz,):
        advantages = advantages[:, None].expand(bsz, length)
    elif advantages.shape != logp.shape:
        raise ValueError(
            f"advantages must be [B] or [B, T], got {tuple(advantages.shape)} for logp {tuple(logp.shape)}"
        )
    terms = per_token_terms(
        logp, old_logp, advantages, weights[:, None].expand(bsz, length), mask, config, ref_logp
    )
    seq_index = torch.arange(bsz, device=logp.device).repeat_interleave(length)
    scales = aggregation_scales(mask.reshape(-1), seq_index, bsz, config).view(bsz, length)
    loss = (terms.loss * scales).sum()
    return loss, summarize(terms, mask, entropy)
