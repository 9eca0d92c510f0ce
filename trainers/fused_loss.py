"""The fused ADRPO policy loss: LM head + log-softmax + loss + gradients, chunk by chunk.

Same loss as `trainers.losses.policy_loss` (same per-token terms, same aggregation), but it starts
from the final hidden states and the LM-head weight, and the `[N, V]` logits never exist: tokens
are processed `chunk_size` at a time with float32 logits `[chunk_size, V]`.

Why one pass is enough: under every aggregation the loss is `sum_t scale_t * loss_t(logp_t)` with
`scale_t` fixed by the mask and sequence membership alone (`losses.aggregation_scales`). So the
derivative `g_t = d loss / d logp_t` is known as soon as a chunk's log-probs are, and the chunk's
gradient follows at once: `d loss / d logits = g * (onehot - softmax) / T`, then
`grad_hidden = dlogits @ W` and `grad_W += dlogits.T @ hidden`. The forward therefore computes the
gradients too (three matmuls per chunk, as many as the naive forward+backward) and the backward
only scales them by the incoming gradient. The price is that `grad_W` (`[V, H]`, in the weight's
dtype) and `grad_hidden` (`[N, H]`) are held from forward to backward.

Inputs in bf16/fp16 are computed in float32 inside (the weight is upcast once per call).

Use in a trainer (also under FSDP2, with tied embeddings):

    hidden = policy_hidden_states(model, input_ids, attention_mask)      # trainers.logprobs
    packed = pack_completions(hidden, input_ids, completion_mask)
    head_weight, head_bias = lm_head_params(model)                       # unshards under FSDP2
    loss, metrics = fused_policy_loss(
        packed.hidden, head_weight, packed.token_ids,
        old_logp[completion_mask], advantages_tok[completion_mask], weights_tok[completion_mask],
        loss_mask[completion_mask], packed.seq_index, packed.num_seqs, config,
        head_bias=head_bias, ref_logp=ref_logp[completion_mask], temperature=0.8)
    loss.backward()   # or accelerator.backward(loss)

`policy_hidden_states` runs the model's own forward, so FSDP2's hooks run as for any forward;
`lm_head_params` returns the unsharded head (calling the owning FSDP module's `unshard()` if it
was resharded), whose gradient FSDP2 then reduce-scatters in its post-backward. Nothing is
patched. With tied embeddings the head weight is the embedding matrix, and its gradient from the
loss adds to the one from the embedding lookup through autograd as usual.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from trainers.logprobs import DEFAULT_CHUNK_SIZE, check_head_inputs, chunk_logits, chunk_stats
from trainers.losses import PolicyLossConfig, aggregation_scales, per_token_terms, summarize


class _TokenData(NamedTuple):
    """The per-token inputs of the loss, all [N]."""

    old_logp: Tensor
    ref_logp: Tensor | None
    advantages: Tensor
    weights: Tensor
    mask: Tensor
    scales: Tensor

    def rows(self, start: int, stop: int) -> _TokenData:
        return _TokenData(*(None if t is None else t[start:stop] for t in self))


class _Outputs(NamedTuple):
    """Buffers the chunks write into; a gradient buffer is None when that input needs none."""

    logp: Tensor  # [N] float32
    entropy: Tensor  # [N] float32, or [0] without entropy
    grad_h: Tensor | None  # [N, H], hidden's dtype
    grad_w: Tensor | None  # [V, H] float32
    grad_b: Tensor | None  # [V] float32


def _process_chunk(
    start: int,
    stop: int,
    hidden: Tensor,  # [N, H]
    w32: Tensor,  # [V, H] float32
    b32: Tensor | None,  # [V] float32
    token_ids: Tensor,  # [N] long
    data: _TokenData,
    config: PolicyLossConfig,
    temperature: float,
    out: _Outputs,
) -> Tensor:  # the chunk's share of the loss (0-dim)
    """Loss, log-probs and gradients of tokens [start, stop); one [C, V] buffer lives here only.

    Kept as a function so the chunk's logits buffer is freed on return, before the next chunk
    allocates its own (a loop variable would keep two alive at the peak).
    """
    h_c = hidden[start:stop].float()
    ids_c = token_ids[start:stop]
    d = data.rows(start, stop)
    stats = chunk_stats(chunk_logits(h_c, w32, b32, temperature), ids_c, out.entropy.numel() > 0)
    out.logp[start:stop] = stats.logp
    if stats.entropy is not None:
        out.entropy[start:stop] = stats.entropy
    need_grad = out.grad_h is not None or out.grad_w is not None or out.grad_b is not None
    with torch.enable_grad():
        lp = stats.logp.detach().requires_grad_(need_grad)
        terms = per_token_terms(lp, d.old_logp, d.advantages, d.weights, d.mask, config, d.ref_logp)
        loss_c = (terms.loss * d.scales).sum()
        coef = torch.autograd.grad(loss_c, lp)[0] if need_grad else None
    if coef is None or not bool(coef.any()):
        return loss_c.detach()  # masked or zero-advantage chunk: its gradient is exactly zero
    coef = coef / temperature
    # exp_shifted becomes dlogits in place: -coef * softmax, plus coef at the chosen token.
    dlogits = stats.exp_shifted.div_(stats.sum_exp).mul_(-coef[:, None])
    dlogits.scatter_add_(1, ids_c[:, None], coef[:, None])
    if out.grad_h is not None:
        out.grad_h[start:stop] = (dlogits @ w32).to(out.grad_h.dtype)
    if out.grad_w is not None:
        out.grad_w.addmm_(dlogits.t(), h_c)
    if out.grad_b is not None:
        out.grad_b.add_(dlogits.sum(dim=0))
    return loss_c.detach()


class _FusedPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,  # [N, H]
        head_weight: Tensor,  # [V, H]
        head_bias: Tensor | None,  # [V]
        token_ids: Tensor,  # [N] long
        data: _TokenData,
        config: PolicyLossConfig,
        temperature: float,
        chunk_size: int,
        with_entropy: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        need_b = head_bias is not None and ctx.needs_input_grad[2]
        n, dim = hidden.shape
        vocab = head_weight.shape[0]
        device = hidden.device
        f32 = dict(dtype=torch.float32, device=device)
        out = _Outputs(
            logp=torch.empty(n, **f32),
            entropy=torch.empty(n if with_entropy else 0, **f32),
            grad_h=torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None,
            grad_w=torch.zeros(vocab, dim, **f32) if ctx.needs_input_grad[1] else None,
            grad_b=torch.zeros(vocab, **f32) if need_b else None,
        )
        w32 = head_weight.float()
        b32 = head_bias.float() if head_bias is not None else None
        loss = torch.zeros((), **f32)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            loss += _process_chunk(start, stop, hidden, w32, b32, token_ids, data, config, temperature, out)

        ctx.save_for_backward(
            out.grad_h,
            out.grad_w.to(head_weight.dtype) if out.grad_w is not None else None,
            out.grad_b.to(head_bias.dtype) if out.grad_b is not None else None,
        )
        ctx.mark_non_differentiable(out.logp, out.entropy)
        return loss, out.logp, out.entropy

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_logp: Tensor, _grad_entropy: Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        if bool(grad_loss == 1.0):
            # The usual `loss.backward()`: hand the gradients over as they are, saving a [V, H] copy.
            return grad_h, grad_w, grad_b, *([None] * 6)
        scaled = [None if g is None else g * grad_loss.to(g.dtype) for g in (grad_h, grad_w, grad_b)]
        return (*scaled, *([None] * 6))


def fused_policy_loss(
    hidden: Tensor,  # [N, H] final hidden states predicting each completion token
    head_weight: Tensor,  # [V, H] LM-head weight (the embedding matrix if tied)
    token_ids: Tensor,  # [N] sampled tokens
    old_logp: Tensor,  # [N] log-probs under the sampling policy
    advantages: Tensor,  # [N] advantage of each token (its sequence's, usually)
    weights: Tensor,  # [N] attribution weight of each token's sequence
    mask: Tensor,  # [N] bool, True where the token enters the loss
    seq_index: Tensor,  # [N] long, sequence of each token, in [0, num_seqs)
    num_seqs: int,
    config: PolicyLossConfig,
    *,
    head_bias: Tensor | None = None,  # [V]
    ref_logp: Tensor | None = None,  # [N] reference log-probs (needed when config.beta > 0)
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,  # tokens per chunk: [chunk_size, V] float32 logits at a time
    with_entropy: bool = False,
) -> tuple[Tensor, dict[str, float]]:
    """ADRPO policy loss straight from hidden states; returns `(loss, metrics)`.

    Differentiable in `hidden`, `head_weight` and `head_bias`; the other inputs are data. Metrics
    are those of `losses.policy_loss`, plus `entropy_mean` when `with_entropy`.
    """
    check_head_inputs(hidden, head_weight, token_ids, head_bias, temperature)
    n = hidden.shape[0]
    for name, t in (
        ("old_logp", old_logp),
        ("advantages", advantages),
        ("weights", weights),
        ("mask", mask),
        ("ref_logp", ref_logp),
    ):
        if t is not None and t.shape != (n,):
            raise ValueError(f"{name} must be [N]=[{n}] (one value per token), got {tuple(t.shape)}")
    if config.beta != 0.0 and ref_logp is None:
        raise ValueError(f"beta={config.beta} needs ref_logp (reference log-probs); got None")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    scales = aggregation_scales(mask, seq_index, num_seqs, config)
    if not torch.is_grad_enabled():
        # Under no_grad the Function would still see requires_grad inputs and build gradients.
        hidden, head_weight = hidden.detach(), head_weight.detach()
        head_bias = head_bias.detach() if head_bias is not None else None
    loss, logp, entropy = _FusedPolicyLoss.apply(
        hidden,
        head_weight,
        head_bias,
        token_ids.long(),
        _TokenData(
            old_logp.detach(),
            ref_logp.detach() if ref_logp is not None else None,
            advantages.detach(),
            weights.detach(),
            mask,
            scales,
        ),
        config,
        float(temperature),
        int(chunk_size),
        with_entropy,
    )
    terms = per_token_terms(logp, old_logp, advantages, weights, mask, config, ref_logp)
    return loss, summarize(terms, mask, entropy if with_entropy else None)
