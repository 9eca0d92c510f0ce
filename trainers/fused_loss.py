"""The fused ADRPO policy loss: LM head + log-softmax + loss + gradients, chunk by chunk.

Same loss as `trainers.losses.policy_loss` (same per-token terms, same aggregation), but it starts
from the final hidden states and the LM-head weight, and the `[N, V]` logits never exist: tokens
are processed `chunk_size` at a time with float32 logits `[chunk_size, V]` (the softmax math is
float32 whatever the input dtype).

Why one pass is enough: under every aggregation the loss is `sum_t scale_t * loss_t(logp_t)` with
`scale_t` fixed by the mask and sequence membership alone (`losses.aggregation_scales`). So the
derivative `g_t = d loss / d logp_t` is known as soon as a chunk's log-probs are, and the chunk's
gradient follows at once: `d loss / d logits = g * (onehot - softmax) / T`, then
`grad_hidden = dlogits @ W` and `grad_W += dlogits.T @ hidden`. The forward therefore computes the
gradients too (three matmuls per chunk, as many as the naive forward+backward) and the backward
only scales them by the incoming gradient. The price is that `grad_W` (`[V, H]`, in the weight's
dtype) and `grad_hidden` (`[N, H]`) are held from forward to backward.

Precision. A float32 head is the reference path: every matmul and all softmax math in float32.
A bf16/fp16 head runs the three matmuls per chunk in that dtype (PyTorch's bf16 matmuls on CPU and
CUDA accumulate in float32 inside; only their outputs are rounded), upcasts each chunk's `[C, V]`
logits to float32 for the max / exp / log-sum-exp / loss math, rounds the chunk's `dlogits` to the
matmul dtype for the two gradient matmuls, and accumulates the weight's gradient in ONE buffer of
the weight's dtype, rounded once per chunk (no float32 copy of the weight, no float32 gradient
plus a low-precision copy). The logits then carry one bf16 rounding, as a bf16 model's own
`lm_head` followed by `.float()` and log-softmax does; tests/trainers/test_fused_loss.py states
the resulting tolerances against the float32 reference.

Masked tokens (padding in the padded layout) are dropped before the head: no matmul sees them,
so whatever they hold, even NaN, cannot reach the loss or the gradients.

`fused_token_nll` is the same machinery for supervised fine-tuning: the summed negative
log-likelihood of the given tokens (`trainers.sft` uses it on the target positions only).

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

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from trainers.logprobs import DEFAULT_CHUNK_SIZE, check_head_inputs, chunk_stats
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
    grad_w: Tensor | None  # [V, H], the weight's dtype (the only weight-sized buffer)
    grad_b: Tensor | None  # [V] float32 (small: accumulated in float32, cast once at the end)


# The per-chunk loss: (logp [C] float32, start, stop, need_grad) -> (loss_c 0-dim, coef [C] or None),
# coef = d loss_c / d logp. None (or all zeros) means the chunk contributes no gradient.
ChunkLoss = Callable[[Tensor, int, int, bool], tuple[Tensor, Tensor | None]]


def _matmul_dtype(weight: Tensor) -> torch.dtype:
    """bf16/fp16 heads multiply in their own dtype; anything else in float32 (the reference)."""
    return weight.dtype if weight.dtype in (torch.bfloat16, torch.float16) else torch.float32


def _chunk_logits32(h_c: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    """Tempered float32 logits `[C, V]` of one chunk; the matmul runs in `h_c`'s dtype.

    In bf16 the matmul's output is rounded to bf16 once and then upcast (a transient `[C, V]` bf16
    buffer next to the float32 one); the bias is added in float32.
    """
    if h_c.dtype == torch.float32:
        logits = torch.addmm(bias.float(), h_c, weight.t()) if bias is not None else h_c @ weight.t()
    else:
        logits = (h_c @ weight.t()).float()
        if bias is not None:
            logits.add_(bias.float())
    if temperature != 1.0:
        logits.div_(temperature)
    return logits


def _process_chunk(
    start: int,
    stop: int,
    hidden: Tensor,  # [N, H]
    weight: Tensor,  # [V, H], float32 or the matmul dtype
    bias: Tensor | None,  # [V]
    token_ids: Tensor,  # [N] long
    chunk_loss: ChunkLoss,
    temperature: float,
    out: _Outputs,
) -> Tensor:  # the chunk's share of the loss (0-dim)
    """Loss, log-probs and gradients of tokens [start, stop); one [C, V] buffer lives here only.

    Kept as a function so the chunk's logits buffer is freed on return, before the next chunk
    allocates its own (a loop variable would keep two alive at the peak).
    """
    mm_dtype = _matmul_dtype(weight)
    h_c = hidden[start:stop].to(mm_dtype)
    ids_c = token_ids[start:stop]
    stats = chunk_stats(_chunk_logits32(h_c, weight, bias, temperature), ids_c, out.entropy.numel() > 0)
    out.logp[start:stop] = stats.logp
    if stats.entropy is not None:
        out.entropy[start:stop] = stats.entropy
    need_grad = out.grad_h is not None or out.grad_w is not None or out.grad_b is not None
    loss_c, coef = chunk_loss(stats.logp, start, stop, need_grad)
    if coef is None or not bool(coef.any()):
        return loss_c  # masked or zero-advantage chunk: its gradient is exactly zero
    coef = coef / temperature
    # exp_shifted becomes dlogits in place: -coef * softmax, plus coef at the chosen token.
    dlogits = stats.exp_shifted.div_(stats.sum_exp).mul_(-coef[:, None])
    dlogits.scatter_add_(1, ids_c[:, None], coef[:, None])
    if out.grad_b is not None:
        out.grad_b.add_(dlogits.sum(dim=0))
    # bf16/fp16: the two gradient matmuls take dlogits rounded to the matmul dtype (no-op in fp32).
    dl = dlogits.to(mm_dtype)
    del dlogits, stats
    if out.grad_h is not None:
        out.grad_h[start:stop] = (dl @ weight).to(out.grad_h.dtype)
    if out.grad_w is not None:
        out.grad_w.addmm_(dl.t(), h_c)
    return loss_c


def _policy_chunk_loss(data: _TokenData, config: PolicyLossConfig) -> ChunkLoss:
    """The ADRPO per-chunk loss and its derivative in logp (autograd on the [C] terms only)."""

    def chunk_loss(logp: Tensor, start: int, stop: int, need_grad: bool) -> tuple[Tensor, Tensor | None]:
        d = data.rows(start, stop)
        with torch.enable_grad():
            lp = logp.detach().requires_grad_(need_grad)
            terms = per_token_terms(lp, d.old_logp, d.advantages, d.weights, d.mask, config, d.ref_logp)
            loss_c = (terms.loss * d.scales).sum()
            coef = torch.autograd.grad(loss_c, lp)[0] if need_grad else None
        return loss_c.detach(), coef

    return chunk_loss


def _nll_chunk_loss(logp: Tensor, start: int, stop: int, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Summed negative log-likelihood: loss_c = -sum(logp), so d loss_c / d logp = -1."""
    return -logp.sum(), (torch.full_like(logp, -1.0) if need_grad else None)


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,  # [N, H]
        head_weight: Tensor,  # [V, H]
        head_bias: Tensor | None,  # [V]
        token_ids: Tensor,  # [N] long
        chunk_loss: ChunkLoss,
        temperature: float,
        chunk_size: int,
        with_entropy: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        need_b = head_bias is not None and ctx.needs_input_grad[2]
        n, dim = hidden.shape
        vocab = head_weight.shape[0]
        device = hidden.device
        f32 = dict(dtype=torch.float32, device=device)
        # A float32 head is used as it is; a bf16/fp16 head too (its matmuls run in its dtype).
        # Only an unusual dtype (e.g. float64) is converted, to the float32 reference path.
        weight = head_weight if head_weight.dtype == _matmul_dtype(head_weight) else head_weight.float()
        out = _Outputs(
            logp=torch.empty(n, **f32),
            entropy=torch.empty(n if with_entropy else 0, **f32),
            grad_h=torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None,
            grad_w=torch.zeros(vocab, dim, dtype=weight.dtype, device=device) if ctx.needs_input_grad[1] else None,
            grad_b=torch.zeros(vocab, **f32) if need_b else None,
        )
        loss = torch.zeros((), **f32)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            loss += _process_chunk(start, stop, hidden, weight, head_bias, token_ids, chunk_loss, temperature, out)

        grad_w = out.grad_w
        if grad_w is not None and grad_w.dtype != head_weight.dtype:
            grad_w = grad_w.to(head_weight.dtype)  # the float64 case only
        ctx.save_for_backward(
            out.grad_h,
            grad_w,
            out.grad_b.to(head_bias.dtype) if out.grad_b is not None else None,
        )
        ctx.mark_non_differentiable(out.logp, out.entropy)
        return loss, out.logp, out.entropy

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_logp: Tensor, _grad_entropy: Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        if bool(grad_loss == 1.0):
            # The usual `loss.backward()`: hand the gradients over as they are, saving a [V, H] copy.
            return grad_h, grad_w, grad_b, *([None] * 5)
        scaled = [None if g is None else g * grad_loss.to(g.dtype) for g in (grad_h, grad_w, grad_b)]
        return (*scaled, *([None] * 5))


def _apply_head_loss(hidden, head_weight, head_bias, token_ids, chunk_loss, temperature, chunk_size, with_entropy):
    if not torch.is_grad_enabled():
        # Under no_grad the Function would still see requires_grad inputs and build gradients.
        hidden, head_weight = hidden.detach(), head_weight.detach()
        head_bias = head_bias.detach() if head_bias is not None else None
    return _FusedHeadLoss.apply(
        hidden, head_weight, head_bias, token_ids.long(), chunk_loss, float(temperature), int(chunk_size), with_entropy
    )


def fused_token_nll(
    hidden: Tensor,  # [N, H] hidden states predicting each token
    head_weight: Tensor,  # [V, H] LM-head weight (the embedding matrix if tied)
    token_ids: Tensor,  # [N] target tokens
    *,
    head_bias: Tensor | None = None,  # [V]
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:  # 0-dim float32
    """Summed NLL `-sum_t log_softmax(hidden_t @ W.T + b)[token_t]` without the `[N, V]` logits.

    Differentiable in `hidden`, `head_weight` and `head_bias`. Pass only the rows that carry loss:
    every row given reaches the matmuls.
    """
    check_head_inputs(hidden, head_weight, token_ids, head_bias, 1.0)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    loss, _, _ = _apply_head_loss(hidden, head_weight, head_bias, token_ids, _nll_chunk_loss, 1.0, chunk_size, False)
    return loss


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
    # Masked rows (padding, in the padded layout) never reach the head: a matmul would multiply
    # whatever they hold into the head's gradient even at coefficient 0 (0 * NaN is NaN).
    keep = None if bool(mask.all()) else mask.nonzero().squeeze(1)

    def rows(t: Tensor | None) -> Tensor | None:
        return t if keep is None or t is None else t[keep]

    data = _TokenData(
        rows(old_logp.detach()),
        rows(ref_logp.detach() if ref_logp is not None else None),
        rows(advantages.detach()),
        rows(weights.detach()),
        rows(mask),
        rows(scales),
    )
    loss, logp, entropy = _apply_head_loss(
        rows(hidden), head_weight, head_bias, rows(token_ids), _policy_chunk_loss(data, config), temperature,
        chunk_size, with_entropy,
    )  # fmt: skip
    if keep is not None:
        # Masked tokens count in no metric; they get ratio 1 (logp = old_logp) and entropy 0.
        full_logp = old_logp.detach().float().clone()
        full_logp[keep] = logp
        full_entropy = torch.zeros(n if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        if with_entropy:
            full_entropy[keep] = entropy
        logp, entropy = full_logp, full_entropy
    terms = per_token_terms(logp, old_logp, advantages, weights, mask, config, ref_logp)
    return loss, summarize(terms, mask, entropy if with_entropy else None)
